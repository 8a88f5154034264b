"""fixedpoint.train: the plain loop and the Lightning adapter on a synthetic task; `fixedpoint train`."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from fixedpoint import InputError
from fixedpoint.cli import main
from fixedpoint.approx import starsaber_flops_per_token
from fixedpoint.starsaber import StarSaber
from fixedpoint.train import (
    MODELS, SequenceClassifier, TrainConfig, accuracy, build_classifier, fit, flops_per_token, lightning_module, load_task,
    synthetic_task,
)


@pytest.mark.parametrize("model", list(MODELS))
def test_every_model_learns_majority(model):
    train, test = synthetic_task("majority", 512, 9, seed=1), synthetic_task("majority", 256, 9, seed=2)
    classifier = build_classifier(model, 1, 2, hidden_size=16, num_layers=2, num_heads=2, max_len=16)
    before = accuracy(classifier, *test)
    result = fit(classifier, train, test, TrainConfig(epochs=8, learning_rate=3e-3))
    assert result.accuracy >= 0.95 and result.accuracy > before
    assert result.losses[-1] < result.losses[0]
    assert result.parameters == sum(p.numel() for p in classifier.parameters())


def test_tasks_have_the_labels_they_promise():
    inputs, labels = synthetic_task("first", 64, 5, seed=0)
    assert torch.equal(labels, (inputs[:, 0, 0] > 0).long())
    inputs, labels = synthetic_task("majority", 64, 5, seed=0)
    assert torch.equal(labels, (inputs.sum((1, 2)) > 0).long())
    inputs, labels = synthetic_task("parity", 64, 5, seed=0)
    assert torch.equal(labels, inputs.sum((1, 2)).long() % 2)
    with pytest.raises(InputError, match="odd"):
        synthetic_task("majority", 4, 6)
    with pytest.raises(InputError, match="task must be"):
        synthetic_task("copy", 4, 5)


def test_bad_configurations_are_refused():
    with pytest.raises(InputError, match="batch_first"):
        SequenceClassifier(StarSaber(1, 4), 2)
    with pytest.raises(InputError, match="model must be"):
        build_classifier("lstm", 1, 2)
    with pytest.raises(InputError, match="learning_rate"):
        TrainConfig(learning_rate=0.0)


def test_lightning_adapter_trains_or_names_the_extra(monkeypatch):
    classifier = build_classifier("starsaber", 1, 2, hidden_size=16, num_layers=2, num_heads=2, max_len=16)
    try:
        import lightning
    except ImportError:
        with pytest.raises(InputError, match=r"fixedpoint\[train\]"):
            lightning_module(classifier)
        return
    train = torch.utils.data.TensorDataset(*synthetic_task("majority", 512, 9, seed=1))
    test = torch.utils.data.TensorDataset(*synthetic_task("majority", 128, 9, seed=2))
    module = lightning_module(classifier, learning_rate=3e-3)
    torch.manual_seed(0)
    trainer = lightning.Trainer(max_epochs=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(train, batch_size=64, shuffle=True),
                torch.utils.data.DataLoader(test, batch_size=128))
    assert float(trainer.callback_metrics["val_accuracy"]) >= 0.9
    assert accuracy(classifier, *synthetic_task("majority", 128, 9, seed=2)) >= 0.9  # the wrapped model trained


def test_lightning_missing_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)  # import lightning now raises ImportError
    with pytest.raises(InputError, match=r"pip install 'fixedpoint\[train\]'"):
        lightning_module(build_classifier("rezero", 1, 2, hidden_size=8, num_layers=1, num_heads=1))


def test_cli_train_json(capsys):
    code = main(["train", "--model", "starsaber", "--task", "majority", "--seq-len", "9", "--hidden", "16",
                 "--train-samples", "512", "--test-samples", "128", "--epochs", "8", "--lr", "3e-3", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] >= 0.9 and report["parameters"] > 0 and report["wall_time"] > 0
    assert main(["train", "--model", "lstm", "--task", "majority"]) == 2
    assert main(["train", "--model", "rezero", "--task", "majority", "--seq-len", "8"]) == 2
    assert "odd seq_len" in capsys.readouterr().err


def test_token_classifier_learns_and_averages_only_real_tokens():
    # label: whether token 5 occurs; texts of random length, padded at the end
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 8, (600, 12), generator=generator)
    lengths = torch.randint(1, 13, (600,), generator=generator)
    ids[torch.arange(12) >= lengths[:, None]] = 0
    labels = (ids == 5).any(1).long()
    classifier = build_classifier("starsaber", 8, 2, hidden_size=16, num_layers=1, num_heads=2, max_len=12, vocab_size=8)
    result = fit(classifier, (ids[:500], labels[:500]), (ids[500:], labels[500:]), TrainConfig(epochs=15, learning_rate=3e-3))
    assert result.accuracy >= 0.9
    with torch.no_grad():  # an all-padding text averages over nothing: the logits are the readout's bias
        assert torch.equal(classifier(torch.zeros(2, 12, dtype=torch.long)), classifier.readout.bias.expand(2, 2))
        assert torch.all(classifier.embedding(torch.zeros(1, dtype=torch.long)) == 0)


def test_inputs_of_the_wrong_kind_are_refused():
    tokens = build_classifier("transformer", 8, 2, hidden_size=8, num_layers=1, num_heads=1, max_len=4, vocab_size=10)
    features = build_classifier("transformer", 8, 2, hidden_size=8, num_layers=1, num_heads=1, max_len=4)
    with pytest.raises(InputError, match="token ids"):
        tokens(torch.randn(2, 4, 8))
    with pytest.raises(InputError, match="vocab_size"):
        features(torch.zeros(2, 4, 8, dtype=torch.long))


def test_starsaber_options_reach_starsaber_and_only_starsaber():
    classifier = build_classifier("starsaber", 3, 2, hidden_size=8, num_heads=2, variant="gated",
                                  shared_position_matrix=True, input_every_layer=False)
    layers = classifier.model.layers
    assert all(layer.variant == "gated" and layer.after is None and layer.after_matrix is layer.before for layer in layers)
    assert layers[0].input_weight is not None and layers[1].input_weight is None
    with pytest.raises(InputError, match="StarSaber options"):
        build_classifier("rezero", 3, 2, variant="gated")
    with pytest.raises(InputError, match="unknown model options"):
        build_classifier("starsaber", 3, 2, dropout=0.1)


@pytest.mark.parametrize("model", ["transformer", "rezero"])
def test_flop_count_of_the_baselines_matches_the_hand_count(model):
    # per token: input map 2IH; per layer q,k,v 6H², output 2H², feed-forward 16H², scores and
    # weighted sum 4TH; readout 2HC per sequence (the CPU attention kernel must be counted)
    inputs, hidden, layers, steps, classes = 5, 16, 2, 12, 3
    classifier = build_classifier(model, inputs, classes, hidden_size=hidden, num_layers=layers, num_heads=4, max_len=steps)
    expected = 2 * inputs * hidden + layers * (24 * hidden**2 + 4 * steps * hidden) + 2 * hidden * classes / steps
    assert flops_per_token(classifier, torch.randn(3, steps, inputs)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("options", [{}, {"variant": "gated"}, {"shared_position_matrix": True}, {"input_every_layer": False}])
def test_flop_count_of_starsaber_matches_its_hand_count(options):
    # the depth study's hand count of the layers, plus the readout 2HC per sequence
    steps, hidden, classes = 10, 8, 3
    classifier = build_classifier("starsaber", 4, classes, hidden_size=hidden, num_heads=2, max_len=steps, **options)
    expected = starsaber_flops_per_token(classifier.model, steps) + 2 * hidden * classes / steps
    assert flops_per_token(classifier, torch.randn(2, steps, 4)) == pytest.approx(expected, rel=1e-12)
    assert classifier.training  # the count leaves the mode as it found it


def test_padding_changes_nothing_but_the_length():
    # attention skips padding and the readout averages real tokens only: more trailing padding,
    # the same logits, for every model, causal or not, in training and evaluation mode
    ids = torch.randint(2, 10, (4, 8), generator=torch.Generator().manual_seed(0))
    ids[1, 5:] = 0
    ids[2, 1:] = 0
    ids[3] = 0
    longer = torch.cat((ids, torch.zeros(4, 5, dtype=torch.long)), dim=1)
    for model in MODELS:
        for causal in (False, True):
            classifier = build_classifier(model, 8, 3, hidden_size=8, num_heads=2, max_len=13, vocab_size=10,
                                          causal=causal).double()
            for training in (True, False):
                classifier.train(training)
                with torch.no_grad():
                    assert torch.allclose(classifier(ids), classifier(longer), rtol=0, atol=1e-12), (model, causal, training)


def test_load_task_wraps_synthetic_tasks_and_refuses_unknown_names():
    data = load_task("first", seq_len=7, train_samples=20, test_samples=10, seed=4)
    assert data.train[0].shape == (20, 7, 1) and data.test[0].shape == (10, 7, 1) and data.num_classes == 2
    assert torch.equal(data.train[0], synthetic_task("first", 20, 7, seed=4)[0])
    assert torch.equal(data.test[0], synthetic_task("first", 10, 7, seed=5)[0])
    with pytest.raises(InputError, match="digits"):
        load_task("copying")


def test_cli_train_passes_starsaber_options(capsys):
    code = main(["train", "--model", "starsaber", "--task", "first", "--seq-len", "5", "--hidden", "8",
                 "--train-samples", "32", "--test-samples", "16", "--epochs", "1", "--variant", "gated",
                 "--input-first-layer-only", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["starsaber_options"] == {"variant": "gated", "input_every_layer": False}
    assert report["classes"] == 2 and report["train_samples"] == 32
    assert main(["train", "--model", "transformer", "--task", "first", "--shared-position-matrix"]) == 2
    assert "StarSaber options" in capsys.readouterr().err
