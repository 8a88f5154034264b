"""StarSaber of depth K against K steps of the solvers, on Elman and GRU teachers.

``figures/approx_depth.png`` (+ JSON): for each teacher (torch.nn default weights, and W_hh
scaled up so that Jacobi is slow), the held-out relative error of StarSaber students trained to
the exact fixed point (bridge and random initialisation) beside K Jacobi sweeps, K Anderson and
K Newton steps and Banach's a-priori bound (:mod:`fixedpoint.approx`).

    python analysis/approx_depth.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse

import torch

from _common import WEIGHT_SEED, add_output_arguments, metadata, output_directory, write_and_reload
from fixedpoint import Network
from fixedpoint.approx import ApproxSettings, run_approx
from fixedpoint.plotting import plot_approx_depth

#: (cell, W_hh scale) per panel: Elman × 0.5 has a certified L < 1 (the Banach bound exists);
#: Elman × 2 and GRU × 3 make Jacobi slow; GRU × 1 is torch.nn's default.
TEACHERS = [("elman", 0.5), ("elman", 2.0), ("gru", 1.0), ("gru", 3.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    args = parser.parse_args()
    out = output_directory(args, "approx-depth-")
    hidden = 4 if args.quick else 16
    settings = (
        ApproxSettings(depths=(1, 2), seq_len=8, train_samples=8, test_samples=4, steps=3)
        if args.quick
        else ApproxSettings(depths=(1, 2, 4, 8), seq_len=32, train_samples=128, test_samples=64, steps=200)
    )
    torch.manual_seed(WEIGHT_SEED)
    panels = []
    for kind, scale in TEACHERS:
        cell = Network.random(kind, hidden, hidden, scale=scale, seed=WEIGHT_SEED).cells[0][0]
        result = run_approx(cell, settings)
        errors = ", ".join(f"K={r['depth']}: {r['starsaber_rel_error']:.2e}" for r in result["results"])
        print(f"{kind} ×{scale}: StarSaber {errors}", flush=True)
        panels.append({"title": f"{kind}, W_hh × {scale:g}", "result": result})
    data = {"panels": panels}
    data["metadata"] = metadata("analysis/approx_depth.py", args.quick, {"hidden": hidden, **settings.__dict__})
    data = write_and_reload(out / "approx_depth.json", data)
    plot_approx_depth(data, out / "approx_depth.png")
    print(f"wrote {out / 'approx_depth.png'}")


if __name__ == "__main__":
    main()
