"""Hand-off to an ordinary trainer: sequence classification with StarSaber, a Transformer or ReZero.

:class:`SequenceClassifier` puts a readout on any of the three models (mean of the last layer's
states over positions, then a linear layer: the same for causal and bidirectional models);
:func:`fit` is a plain PyTorch loop (AdamW, cross-entropy, mini-batches); :func:`lightning_module`
wraps the same classifier for PyTorch Lightning, imported only when called (the ``train`` extra).
:func:`synthetic_task` makes tasks that need no download.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from fixedpoint.baselines import ReZero, Transformer
from fixedpoint.datasets import DATASETS, PAD, Dataset, load_dataset
from fixedpoint.errors import InputError
from fixedpoint.solvers.base import check_integer, check_number
from fixedpoint.starsaber import StarSaber

ModelName = Literal["starsaber", "transformer", "rezero"]
MODELS: dict[str, type[nn.Module]] = {"starsaber": StarSaber, "transformer": Transformer, "rezero": ReZero}
#: Synthetic classification tasks: inputs ``(N, T, 1)`` of ±1 (``first``, ``majority``) or 0/1 (``parity``).
TASKS = ("first", "majority", "parity")
#: ``progress(epoch, epochs, step, steps)``.
Progress = Callable[[int, int, int, int], None]


def synthetic_task(name: str, samples: int, seq_len: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(inputs (N, T, 1) float32, labels (N,) long)`` for one of :data:`TASKS`.

    ``first``: the label is the sign of the first token (memory across the sequence);
    ``majority``: the sign of the sum (``T`` odd avoids ties, an even ``T`` is refused);
    ``parity``: the number of ones modulo 2 (hard for attention without recurrence).
    """
    if name not in TASKS:
        raise InputError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
    check_integer("samples", samples)
    check_integer("seq_len", seq_len)
    if name == "majority" and seq_len % 2 == 0:
        raise InputError(f"the majority task needs an odd seq_len (no ties), got {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (samples, seq_len), generator=generator)
    if name == "parity":
        return bits.unsqueeze(-1).float(), bits.sum(1) % 2
    signs = 2 * bits - 1
    labels = (signs[:, 0] > 0) if name == "first" else (signs.sum(1) > 0)
    return signs.unsqueeze(-1).float(), labels.long()


def load_task(
    name: str,
    *,
    seq_len: int | None = None,
    train_samples: int = 2048,
    test_samples: int = 512,
    vocab_size: int = 10_000,
    seed: int = 0,
) -> Dataset:
    """A synthetic task of :data:`TASKS` (``seq_len`` default 33; training data from ``seed``,
    held-out data from ``seed + 1``) or an offline dataset of :data:`~fixedpoint.datasets.DATASETS`
    (its own split and sizes; ``train_samples`` and ``test_samples`` do not apply)."""
    if name in DATASETS:
        return load_dataset(name, seq_len=seq_len, vocab_size=vocab_size)
    if name not in TASKS:
        raise InputError(f"task must be one of {', '.join(TASKS + DATASETS)}, got {name!r}")
    length = 33 if seq_len is None else seq_len
    train = synthetic_task(name, train_samples, length, seed=seed)
    test = synthetic_task(name, test_samples, length, seed=seed + 1)
    return Dataset(name, train, test, ("0", "1"))


class SequenceClassifier(nn.Module):
    """A sequence model (batch-first) and a readout: ``(B, T, I) → logits (B, classes)``.

    With ``vocab_size`` the inputs are token ids ``(B, T)``: an embedding of width
    ``model.input_size`` (id :data:`~fixedpoint.datasets.PAD` embeds to zeros) feeds the model,
    attention skips padded positions (``key_padding_mask``), and the readout averages over the
    positions that are not padding.
    """

    def __init__(self, model: nn.Module, num_classes: int, vocab_size: int | None = None) -> None:
        super().__init__()
        check_integer("num_classes", num_classes, 2)
        if not getattr(model, "batch_first", False):
            raise InputError("the sequence model must be built with batch_first=True")
        self.model = model
        self.embedding = None
        if vocab_size is not None:
            check_integer("vocab_size", vocab_size, 2)
            self.embedding = nn.Embedding(vocab_size, model.input_size, padding_idx=PAD)
        self.readout = nn.Linear(model.hidden_size, num_classes)

    def forward(self, inputs: Tensor) -> Tensor:
        if self.embedding is None:
            if inputs.is_floating_point():
                output, _ = self.model(inputs)
                return self.readout(output.mean(dim=1))
            raise InputError(f"this classifier takes float features (B, T, I), got {inputs.dtype} (build it with vocab_size for token ids)")
        if inputs.dim() != 2 or inputs.dtype != torch.long:
            raise InputError(f"this classifier takes token ids (B, T) of dtype long, got {inputs.dtype} {tuple(inputs.shape)}")
        padding = inputs == PAD
        # attention skips padding; an all-padding text keeps its first position, or softmax has no key
        attended = padding.clone()
        attended[:, 0] = False
        output, _ = self.model(self.embedding(inputs), key_padding_mask=attended)
        mask = (~padding).unsqueeze(-1).to(output.dtype)
        return self.readout((output * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1))


#: StarSaber's own options (the two ablations and the variant), refused by the baselines.
STARSABER_OPTIONS = ("variant", "shared_position_matrix", "input_every_layer", "nonlinearity", "attention")


def build_classifier(
    name: str,
    input_size: int,
    num_classes: int,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    causal: bool = False,
    max_len: int = 512,
    vocab_size: int | None = None,
    seed: int = 0,
    **starsaber_options: Any,
) -> SequenceClassifier:
    """One of :data:`MODELS` with matched width, depth and heads, and the readout.

    ``vocab_size``: token-id inputs embedded to ``input_size``. ``starsaber_options`` (names in
    :data:`STARSABER_OPTIONS`) go to :class:`StarSaber` and are refused for the baselines.
    """
    if name not in MODELS:
        raise InputError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
    unknown = set(starsaber_options) - set(STARSABER_OPTIONS)
    if unknown:
        raise InputError(f"unknown model options {sorted(unknown)}; StarSaber takes {', '.join(STARSABER_OPTIONS)}")
    if starsaber_options and name != "starsaber":
        raise InputError(f"{sorted(starsaber_options)} are StarSaber options; the {name} baseline has none")
    torch.manual_seed(seed)
    model = MODELS[name](
        input_size, hidden_size, num_layers, num_heads=num_heads, causal=causal, max_len=max_len, batch_first=True,
        **starsaber_options,
    )
    return SequenceClassifier(model, num_classes, vocab_size)


def flops_per_token(classifier: nn.Module, inputs: Tensor) -> float:
    """Forward floating-point operations per position, counted by torch's ``FlopCounterMode``
    on ``inputs`` (``(B, T, …)``): matrix products and attention only, elementwise work excluded,
    the same rule for every model."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query: Any, key: Any, value: Any, *_: Any, out_shape: Any = None, **__: Any) -> int:
        return sdpa_flop_count(query, key, value)

    was_training = classifier.training
    classifier.eval()
    # torch's table has no entry for the CPU attention kernel; without one it counts zero
    cpu_kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    counter = FlopCounterMode(display=False, custom_mapping={cpu_kernel: cpu_attention})
    with counter, torch.enable_grad():  # with grad off, torch's fused encoder kernel hides its FLOPs
        classifier(inputs)
    classifier.train(was_training)
    return counter.get_total_flops() / (inputs.shape[0] * inputs.shape[1])


@dataclass(frozen=True)
class TrainConfig:
    """``epochs`` passes of mini-batches of ``batch_size`` (shuffled from ``seed``), AdamW."""

    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_integer("epochs", self.epochs)
        check_integer("batch_size", self.batch_size)
        check_number("learning_rate", self.learning_rate, 0, low_open=True)
        check_number("weight_decay", self.weight_decay, 0)
        check_integer("seed", self.seed, 0)


@dataclass
class TrainResult:
    """Accuracies on the held-out and training data, the loss per epoch, size and time."""

    accuracy: float
    train_accuracy: float
    parameters: int
    seconds: float
    losses: list[float] = field(default_factory=list)


@torch.no_grad()
def accuracy(classifier: nn.Module, inputs: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Fraction of ``labels`` predicted correctly."""
    classifier.eval()
    correct = sum(
        int((classifier(inputs[i : i + batch_size]).argmax(-1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(labels), batch_size)
    )
    return correct / len(labels)


def fit(
    classifier: nn.Module,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    config: TrainConfig = TrainConfig(),
    progress: Progress | None = None,
) -> TrainResult:
    """Train with AdamW on cross-entropy; returns held-out and training accuracy."""
    inputs, labels = train
    if inputs.shape[0] != labels.shape[0] or test[0].shape[0] != test[1].shape[0]:
        raise InputError("inputs and labels must have the same number of samples")
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    steps = -(-len(labels) // config.batch_size)
    losses = []
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        classifier.train()
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        for step in range(steps):
            batch = order[step * config.batch_size : (step + 1) * config.batch_size]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(classifier(inputs[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            if progress is not None:
                progress(epoch, config.epochs, step + 1, steps)
        losses.append(total / len(labels))
    seconds = time.perf_counter() - started
    return TrainResult(
        accuracy=accuracy(classifier, *test),
        train_accuracy=accuracy(classifier, *train),
        parameters=sum(p.numel() for p in classifier.parameters()),
        seconds=seconds,
        losses=losses,
    )


def lightning_module(classifier: nn.Module, learning_rate: float = 1e-3) -> Any:
    """``classifier`` as a ``lightning.LightningModule`` (cross-entropy, AdamW, ``val_accuracy``).

    Needs the ``train`` extra (``pip install 'fixedpoint[train]'``); nothing imports Lightning
    before this is called.
    """
    try:
        import lightning
    except ImportError as error:
        raise InputError("the Lightning adapter needs the 'train' extra: pip install 'fixedpoint[train]'") from error

    class Classifier(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = classifier

        def forward(self, inputs: Tensor) -> Tensor:
            return self.classifier(inputs)

        def training_step(self, batch: tuple[Tensor, Tensor], _: int) -> Tensor:
            inputs, labels = batch
            loss = nn.functional.cross_entropy(self.classifier(inputs), labels)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: tuple[Tensor, Tensor], _: int) -> None:
            inputs, labels = batch
            self.log("val_accuracy", (self.classifier(inputs).argmax(-1) == labels).float().mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.classifier.parameters(), lr=learning_rate)

    return Classifier()
