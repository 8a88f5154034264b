"""What every analysis script shares: the studied systems, output folder, JSON and metadata.

Imported first by each script: it puts the repository root on ``sys.path`` so the scripts run
from the source tree without installing, and selects matplotlib's file-only backend.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fixedpoint import Network, SequenceSystem  # noqa: E402
from fixedpoint.data import gaussian_inputs  # noqa: E402

DTYPE = torch.float64
WEIGHT_SEED = 0
INPUT_SEED = 1


def random_system(
    kind: str, input_size: int, hidden: int, seq_len: int, batch: int, scale: float, nonlinearity: str = "tanh"
) -> SequenceSystem:
    """torch.nn's default initialisation from ``WEIGHT_SEED`` with ``W_hh × scale``, N(0, 1) inputs
    from ``INPUT_SEED``, zero initial state, float64."""
    network = Network.random(
        kind, input_size, hidden, scale=scale, seed=WEIGHT_SEED, nonlinearity=nonlinearity, dtype=DTYPE
    )
    return SequenceSystem.build(network.cells[0][0], gaussian_inputs(seq_len, batch, input_size, seed=INPUT_SEED))


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default: figures/ of the repository; with --quick a new temporary directory)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test (seconds)")


def output_directory(args: argparse.Namespace, prefix: str) -> Path:
    """``--out``, else a fresh temporary folder for ``--quick``, else ``figures/``; created."""
    if args.out is not None:
        out = Path(args.out)
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix=prefix))
    else:
        out = ROOT / "figures"
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_and_reload(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Write ``data`` as strict JSON and read it back, so figures show exactly what the file holds."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, separators=(",", ":"), allow_nan=False)
        handle.write("\n")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def metadata(script: str, quick: bool, sizes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Where and how the numbers were made."""
    return {
        "script": script,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "sizes": sizes,
        "dtype": str(DTYPE).removeprefix("torch."),
        "device": "cpu",
        "weight_seed": WEIGHT_SEED,
        "input_seed": INPUT_SEED,
        "weights": "Network.random: torch.nn default U(−1/√H, 1/√H), W_hh multiplied by scale",
        "inputs": "fixedpoint.data.gaussian_inputs(seed=input_seed): N(0, 1)",
        "initial_state": "zeros",
        **extra,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "matplotlib": matplotlib.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
