"""fixedpoint.train: the plain loop and the Lightning adapter on a synthetic task; `fixedpoint train`."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from fixedpoint import InputError
from fixedpoint.cli import main
from fixedpoint.starsaber import StarSaber
from fixedpoint.train import (
    MODELS, SequenceClassifier, TrainConfig, accuracy, build_classifier, fit, lightning_module, synthetic_task,
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
