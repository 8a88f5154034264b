"""Figures from the plain data that the analysis scripts write; this module computes nothing.

Every function takes a ``dict`` as read back from the JSON an ``analysis/`` script wrote (lists of
floats, strings, ints) and a path, and writes one PNG.  It never solves or evaluates anything:
the numbers on a figure are exactly the numbers in the JSON beside it.  The only operations on
data here are reshaping and clipping values to the colour range.

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly, without ``pyplot``, so
importing this module neither selects nor changes a matplotlib backend.

Data layouts (written by ``analysis/convergence.py``):

``plot_residuals(data)``
    ``data["config"]``: ``seq_len, batch, hidden_size, input_size, dtype, scale,
    weight_seed, input_seed``; ``data["panels"]``: one per cell, each with ``title`` and
    ``runs``, one per solver, each with ``label``, ``iterations``, ``result``,
    ``residual_max_over_batch`` (length ``n``: ``max_b max|F(X_k) − X_k|`` for
    ``k = 0 … n−1``) and optionally ``error_max`` (length ``n + 1``: ``max|X_k − S*|``,
    the last entry being the returned solution) and ``draw_error`` (bool).

``plot_wavefront(data)``
    ``data["config"]`` as above; ``data["clip_floor"]``: the smallest value drawn;
    ``data["panels"]``: each with ``cell``, ``solver_label``, ``scale``, ``iterations``,
    ``result`` and ``error_per_position``: ``n + 1`` rows (``k = 0 … n``), each of ``T`` values
    ``max_{b,j} |X_k[t] − S*[t]|``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import colors
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

__all__ = ["config_caption", "plot_approx_depth", "plot_paper_table", "plot_residuals", "plot_wavefront"]

#: One colour per solver, shared by every figure.
SOLVER_COLOURS: dict[str, str] = {
    "picard": "tab:blue", "anderson": "tab:orange", "quasi-newton": "tab:green", "newton": "tab:red",
    "damped newton": "tab:purple", "torch.nn": "black", "auto (fused sequential)": "tab:gray",
}


def config_caption(config: Mapping[str, Any], *, seq_len: int | None = None) -> str:
    """``"T=512, B=16, H=64, float64"`` from a figure's ``config`` entry."""
    steps = config["seq_len"] if seq_len is None else seq_len
    return f"T={steps}, B={config['batch']}, H={config['hidden_size']}, {config['dtype']}"


def _save(figure: Figure, path: str | os.PathLike) -> None:
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.savefig(path, dpi=150)


def _positive(values: Sequence[float]) -> np.ndarray:
    """Values as an array with non-positive entries masked (NaN), so a log axis can show them."""
    array = np.asarray(values, dtype=float)
    return np.where(array > 0, array, np.nan)


def plot_residuals(data: Mapping[str, Any], path: str | os.PathLike) -> Figure:
    """Residual ``max |F(X_k) − X_k|`` (log scale) against the iteration, one panel per cell.

    Each panel shows every solver run of its cell as a solid line with the number of
    iterations in the legend, and, for runs with ``draw_error``, the exact error
    ``max |X_k − S*|`` against the sequential solution as a dashed line in the same colour.
    A thin grey line marks ``atol``.

    Args:
        data: the ``"residuals"`` entry of ``convergence.json`` (layout in the module docstring).
        path: where to write the PNG.

    Returns:
        The figure (already saved).
    """
    config = data["config"]
    panels = data["panels"]
    figure = Figure(figsize=(5.0 * len(panels), 4.6), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for axis, panel in zip(axes, panels):
        _draw_residual_panel(axis, panel, config)
    axes[0].set_ylabel("max over batch, positions, units (log scale)")
    figure.suptitle(
        f"Residual max|F(X_k) − X_k| (solid) and exact error max|X_k − S*| (dashed) per iteration; "
        f"torch-default weights × {config['scale']:g}, weight seed {config['weight_seed']}, "
        f"inputs N(0, 1) seed {config['input_seed']}",
        fontsize=10,
    )
    _save(figure, path)
    return figure


def _draw_residual_panel(axis: Axes, panel: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    for run in panel["runs"]:
        colour = SOLVER_COLOURS.get(run["solver"], None)
        residual = _positive(run["residual_max_over_batch"])
        status = "" if run["result"] == "successful" else f", {run['result']}"
        (line,) = axis.plot(
            np.arange(residual.size),
            residual,
            color=colour,
            lw=1.8,
            label=f"{run['label']}: {run['iterations']} iterations{status}",
        )
        if run.get("draw_error") and run.get("error_max") is not None:
            error = _positive(run["error_max"])
            axis.plot(
                np.arange(error.size),
                error,
                color=line.get_color(),
                lw=1.4,
                ls="--",
                label=f"{run['label']}: error max|X_k − S*|",
            )
    atol = panel.get("atol")
    if atol is not None:
        axis.axhline(atol, color="0.6", lw=0.8, ls=":", label=f"atol = {atol:g}")
    axis.set_yscale("log")
    axis.set_xlabel("iteration k (X_0 = 0)")
    axis.set_title(f"{panel['title']}\n{config_caption(config)}", fontsize=10)
    axis.grid(True, which="major", alpha=0.3)
    axis.legend(fontsize=8, loc="lower left")


def plot_wavefront(data: Mapping[str, Any], path: str | os.PathLike) -> Figure:
    """Heatmaps of ``log10 max_{b,j} |X_k[t] − S*[t]|`` over position ``t`` × iteration ``k``.

    Panels are laid out with one row per solver and one column per weight scale, in the order
    of ``data["panels"]``.  Values below ``data["clip_floor"]`` (exact zeros included) are drawn
    at the floor colour.  The line ``t = k`` is drawn on each: by finite termination every
    position left of it is exact.

    Args:
        data: the ``"wavefront"`` entry of ``convergence.json`` (layout in the module docstring).
        path: where to write the PNG.

    Returns:
        The figure (already saved).
    """
    config = data["config"]
    panels = data["panels"]
    floor = float(data["clip_floor"])
    solvers = list(dict.fromkeys(panel["solver_label"] for panel in panels))
    scales = list(dict.fromkeys(panel["scale"] for panel in panels))
    errors = [np.asarray(panel["error_per_position"], dtype=float) for panel in panels]
    ceiling = max(float(np.max(error)) for error in errors)
    norm = colors.LogNorm(vmin=floor, vmax=10 ** math.ceil(math.log10(max(ceiling, floor * 10))))

    figure = Figure(figsize=(6.0 * len(scales) + 1.0, 4.2 * len(solvers)), layout="constrained")
    grid = figure.subplots(len(solvers), len(scales), squeeze=False, sharex=True)
    image: AxesImage | None = None
    for panel, error in zip(panels, errors):
        axis = grid[solvers.index(panel["solver_label"])][scales.index(panel["scale"])]
        image = _draw_wavefront_panel(axis, panel, error, norm, floor, config)
    for axis in grid[-1]:
        axis.set_xlabel("position t")
    for row in grid:
        row[0].set_ylabel("iteration k")
    colourbar = figure.colorbar(image, ax=grid, shrink=0.9, extend="min")
    colourbar.set_label(f"max over batch and units |X_k[t] − S*[t]|  (values < {floor:g}, incl. 0, at floor)")
    figure.suptitle(
        f"Error wavefront: {panels[0]['cell'].upper()}, weight seed {config['weight_seed']}, "
        f"inputs N(0, 1) seed {config['input_seed']}; left of t = k every position is exact "
        "(finite termination)",
        fontsize=10,
    )
    _save(figure, path)
    return figure


def _draw_wavefront_panel(
    axis: Axes,
    panel: Mapping[str, Any],
    error: np.ndarray,
    norm: colors.Normalize,
    floor: float,
    config: Mapping[str, Any],
) -> AxesImage:
    rows, steps = error.shape
    image = axis.imshow(
        np.clip(error, floor, None),
        origin="lower",
        aspect="auto",
        interpolation="nearest",
        norm=norm,
        cmap="viridis",
        extent=(-0.5, steps - 0.5, -0.5, rows - 0.5),
    )
    reach = min(rows - 1, steps - 1)
    axis.plot([0, reach], [0, reach], color="white", lw=1.2, ls="--", label="t = k (left of it: exact)")
    axis.set_xlim(-0.5, steps - 0.5)
    axis.set_ylim(-0.5, rows - 0.5)
    status = "" if panel["result"] == "successful" else f", {panel['result']}"
    axis.set_title(
        f"{panel['cell'].upper()}, {panel['solver_label']}, W_hh × {panel['scale']:g}: "
        f"{panel['iterations']} iterations{status}\n{config_caption(config, seq_len=steps)}",
        fontsize=10,
    )
    axis.legend(loc="upper right", fontsize=8, framealpha=0.8)
    return image


# -- contraction (data written by analysis/contraction.py) ---------------------------------------
from matplotlib import ticker  # noqa: E402

__all__ += ["plot_contraction_rate", "plot_contraction_looseness"]

#: Colours of the contraction figures: what each number is, not which norm (line style says that).
CONTRACTION_COLOURS: dict[str, str] = {
    "observed": "tab:blue",
    "certified": "tab:red",
    "estimated": "tab:green",
    "sampled": "tab:purple",
}
#: Line style per norm in the contraction figures.
NORM_STYLES: dict[str, str] = {"2": "-", "inf": "--"}
NORM_LABELS: dict[str, str] = {"2": "2-norm", "inf": "∞-norm"}


def _values(values: Sequence[float | None]) -> np.ndarray:
    """A list with ``None`` entries (JSON null) as a float array with NaN there."""
    return np.asarray([np.nan if value is None else value for value in values], dtype=float)


def plot_contraction_rate(data: Mapping[str, Any], path: str | os.PathLike) -> Figure:
    """Observed Picard convergence against the certified and estimated contraction, per cell.

    One column per cell; the ``W_hh`` scale on the x-axis (log).  Top row (log): the observed
    Picard rate, the certified data-conditional ``L`` in both norms and the estimated
    ``max_t ‖J_t‖`` along the solution in both norms, with ``L = 1`` marked.  Bottom row (log):
    the observed Picard iterations beside the certified a-priori iteration count in both norms,
    with ``T`` (finite termination) marked.

    Args:
        data: the ``"rate"`` entry of ``contraction.json``: ``config`` (``seq_len, batch,
            hidden_size, dtype, atol, rtol, weight_seed, input_seed``) and ``panels``, one per
            cell, each with ``title``, ``scales``, ``observed_rate`` (floats or null),
            ``iterations``, ``result``, and per norm (``"2"``, ``"inf"``) the lists
            ``certified``, ``estimated`` and ``predicted_iterations``.
        path: where to write the PNG.

    Returns:
        The figure (already saved).
    """
    # Long on purpose: two rows of panels with their marks and legends; a figure reads best in one
    # place.
    config = data["config"]
    panels = data["panels"]
    steps = config["seq_len"]
    figure = Figure(figsize=(4.2 * len(panels), 7.6), layout="constrained")
    grid = figure.subplots(2, len(panels), squeeze=False, sharex=True)
    lowest = min(10.0, 0.8 * min(min(panel["iterations"]) for panel in panels))  # one iteration axis for all
    for column, panel in enumerate(panels):
        scales = np.asarray(panel["scales"], dtype=float)
        top, bottom = grid[0][column], grid[1][column]
        for norm, style in NORM_STYLES.items():
            top.plot(scales, _positive(panel["certified"][norm]), color=CONTRACTION_COLOURS["certified"],
                     ls=style, marker="s", ms=6, mfc="none", lw=1.4, label=f"certified L ({NORM_LABELS[norm]})")
            top.plot(scales, _positive(_values(panel["estimated"][norm])), color=CONTRACTION_COLOURS["estimated"],
                     ls=style, marker="^", ms=3.5, lw=1.4, label=f"estimated max‖J_t‖ ({NORM_LABELS[norm]})")
            bottom.plot(scales, np.asarray(panel["predicted_iterations"][norm], dtype=float),
                        color=CONTRACTION_COLOURS["certified"], ls=style, marker="s", ms=3.5, lw=1.4,
                        label=f"certified a-priori count ({NORM_LABELS[norm]})")
        top.plot(scales, _positive(_values(panel["observed_rate"])), color=CONTRACTION_COLOURS["observed"],
                 marker="o", ms=5, lw=2.2, label="observed Picard rate")
        # Solves that ran to T ended by finite termination: their rate is not an asymptotic one.
        at_end = [k for k, n in enumerate(panel["iterations"]) if n >= steps]
        if at_end:
            top.plot(scales[at_end], _positive(_values([panel["observed_rate"][k] for k in at_end])), ls="none",
                     marker="o", ms=8, mfc="white", mec=CONTRACTION_COLOURS["observed"], mew=1.6,
                     label="observed rate of a solve that ran to T")
        top.axhline(1.0, color="0.4", lw=0.9, ls=":", label="L = 1")
        bottom.plot(scales, np.asarray(panel["iterations"], dtype=float), color=CONTRACTION_COLOURS["observed"],
                    marker="o", ms=5, lw=2.2, label="observed Picard iterations")
        bottom.axhline(steps, color="0.4", lw=0.9, ls=":", label=f"T = {steps} (finite termination)")
        failed = [s for s, r in zip(scales, panel["result"]) if r != "successful"]
        if failed:
            bottom.plot(failed, [steps] * len(failed), "x", color="k", ms=7, label="not converged")
        top.set_yscale("log")
        bottom.set_yscale("log")
        bottom.set_ylim(bottom=lowest, top=steps * 1.5)
        for axis in (top, bottom):
            axis.set_xscale("log", base=2)
            axis.grid(True, which="both", alpha=0.25)
            axis.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
            axis.yaxis.set_minor_formatter(ticker.NullFormatter())
        bottom.set_yticks([t for t in (10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if t < steps] + [steps])
        bottom.set_xticks(scales)
        bottom.set_xticklabels([f"{s:.2g}" for s in scales], rotation=45, fontsize=8)
        bottom.xaxis.set_minor_locator(ticker.NullLocator())
        bottom.set_xlabel("W_hh scale (× torch default)")
        top.set_title(f"{panel['title']}\n{config_caption(config)}", fontsize=10)
    grid[0][0].set_ylabel("rate / Lipschitz bound (log)")
    grid[1][0].set_ylabel("Picard iterations to tolerance (log)")
    grid[0][0].legend(fontsize=7.5, loc="upper left")
    grid[1][0].legend(fontsize=7.5, loc="lower right")
    figure.suptitle(
        f"Picard from zero vs. contraction: certified (data-conditional, interval) and estimated (along the "
        f"solution); atol = {config['atol']:g}, rtol = {config['rtol']:g}; weight seed {config['weight_seed']}, "
        f"inputs N(0, 1) seed {config['input_seed']}",
        fontsize=10,
    )
    _save(figure, path)
    return figure


def plot_contraction_looseness(data: Mapping[str, Any], path: str | os.PathLike) -> Figure:
    """How loose the certified bounds are: certified ÷ worst sampled ratio and certified ÷ estimated.

    One panel per cell; the ``W_hh`` scale on the x-axis (log), the factor on the y-axis (log,
    1 = tight).  Colour: what the certified bound is divided by; line style: the norm; marker:
    the hidden size.

    Args:
        data: the ``"looseness"`` entry of ``contraction.json``: ``config`` (``seq_len, batch,
            dtype, hidden_sizes``) and ``rows``, each with ``cell``, ``title``, ``hidden_size``,
            ``scale`` and ``norms[norm]`` holding ``certified_over_sampled`` and
            ``certified_over_estimated`` (floats or null).
        path: where to write the PNG.

    Returns:
        The figure (already saved).
    """
    config = data["config"]
    rows = data["rows"]
    cells = list(dict.fromkeys(row["cell"] for row in rows))
    titles = {row["cell"]: row["title"] for row in rows}
    hidden_sizes = list(dict.fromkeys(row["hidden_size"] for row in rows))
    markers = ["o", "^", "s", "D"]
    figure = Figure(figsize=(4.2 * len(cells), 4.6), layout="constrained")
    axes = figure.subplots(1, len(cells), squeeze=False, sharey=True)[0]
    quantities = (("certified_over_sampled", "sampled", "÷ worst sampled ratio"),
                  ("certified_over_estimated", "estimated", "÷ estimated max‖J_t‖"))
    for axis, cell in zip(axes, cells):
        for index, hidden in enumerate(hidden_sizes):
            chosen = [row for row in rows if row["cell"] == cell and row["hidden_size"] == hidden]
            scales = np.asarray([row["scale"] for row in chosen], dtype=float)
            for key, colour, text in quantities:
                for norm, style in NORM_STYLES.items():
                    axis.plot(scales, _positive(_values([row["norms"][norm][key] for row in chosen])),
                              color=CONTRACTION_COLOURS[colour], ls=style, marker=markers[index % len(markers)],
                              ms=5, lw=1.3, alpha=1.0 if index == 0 else 0.6,
                              label=f"certified {text}, {NORM_LABELS[norm]}, H = {hidden}")
        axis.axhline(1.0, color="0.4", lw=0.9, ls=":")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(sorted({row["scale"] for row in rows}))
        axis.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        axis.xaxis.set_minor_locator(ticker.NullLocator())
        axis.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_xlabel("W_hh scale (× torch default)")
        axis.set_title(f"{titles[cell]}, T={config['seq_len']}, B={config['batch']}, {config['dtype']}", fontsize=10)
        axis.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("looseness factor (log; 1 = tight)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=7.5)
    figure.suptitle(
        "Certified data-conditional Lipschitz bound divided by lower bounds of the true constant: the worst "
        "sampled ratio ‖f(s)−f(s')‖/‖s−s'‖ in the box, and ‖J_t‖ along the solution",
        fontsize=10,
    )
    _save(figure, path)
    return figure


# -- the Newton family (analysis/newton_family.py) -----------------------------------------------
def plot_solver_convergence(data: Mapping[str, Any], path: str | os.PathLike) -> Figure:
    """Residual per iteration of every solver: one column per cell, default weights (top) and
    trained-like scaled weights (bottom).

    ``data["panels"]``: each with ``cell``, ``scale``, ``seq_len`` and ``runs`` (``label``,
    ``iterations``, ``result``, ``safe_steps``, ``max_abs_error``, ``residual_max_over_batch``).
    """
    panels = data["panels"]
    cells = list(dict.fromkeys(panel["cell"] for panel in panels))
    figure = Figure(figsize=(5.2 * len(cells), 8.4), layout="constrained")
    axes = figure.subplots(2, len(cells), squeeze=False)
    for panel in panels:
        column = cells.index(panel["cell"])
        row = 0 if panel["scale"] == 1.0 else 1
        axis = axes[row][column]
        for run in panel["runs"]:
            residual = _positive(run["residual_max_over_batch"])
            safe = f", {run['safe_steps']} safe" if run["safe_steps"] else ""
            status = "" if run["result"] == "successful" else f", {run['result']}"
            axis.plot(
                np.arange(1, residual.size + 1), residual, color=SOLVER_COLOURS.get(run["label"]), lw=1.6,
                label=f"{run['label']}: {run['iterations']}{safe}{status}",
            )
        axis.set_yscale("log")
        axis.set_xscale("log")
        axis.set_xlabel("iteration (log scale)")
        axis.set_title(f"{panel['cell']}, W_hh × {panel['scale']:g}, T = {panel['seq_len']}", fontsize=10)
        axis.legend(fontsize=8, title="iterations", title_fontsize=8)
    for row in axes:
        row[0].set_ylabel("max|F(X) − X| over batch (log)")
    meta = data.get("metadata", {})
    sizes = meta.get("sizes", {})
    figure.suptitle(
        f"Convergence of every solver, B = {sizes.get('batch')}, H = {sizes.get('hidden')}, {meta.get('dtype')}; "
        "top: torch.nn default weights, bottom: W_hh scaled until Jacobi is slow",
        fontsize=10,
    )
    _save(figure, path)
    return figure


def plot_solve_time(data: Mapping[str, Any], path: str | os.PathLike) -> Figure:
    """Seconds per solve against ``T`` (log–log), torch.nn beside every method.

    ``data``: ``seq_lens``, ``batch``, ``hidden``, ``dtype`` and ``seconds``: a list per method.
    """
    figure = Figure(figsize=(6.4, 4.6), layout="constrained")
    axis = figure.subplots()
    for name, seconds in data["seconds"].items():
        axis.plot(data["seq_lens"], seconds, marker="o", color=SOLVER_COLOURS.get(name), lw=1.6,
                  ls="--" if name == "torch.nn" else "-", label=name)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("sequence length T")
    axis.set_ylabel("seconds per solve (median)")
    meta = data.get("metadata", {})
    axis.set_title(
        f"GRU, B = {data['batch']}, H = {data['hidden']}, {data['dtype']}, {meta.get('platform', 'CPU')}, "
        f"{meta.get('date', '')[:10]}",
        fontsize=8,
    )
    axis.legend(fontsize=8)
    _save(figure, path)
    return figure


__all__ += ["plot_solver_convergence", "plot_solve_time"]


def plot_approx_depth(data: Mapping[str, Any], path: str | os.PathLike) -> Figure:
    """Held-out relative error against depth ``K``: StarSaber (bridge and random initialisation)
    beside ``K`` Jacobi sweeps, ``K`` Anderson and ``K`` Newton steps and Banach's bound.

    ``data["panels"]``: each with ``title`` and ``result``, an object written by
    :func:`fixedpoint.approx.run_approx` (``teacher`` and ``results``, one per depth).
    """
    series = [
        ("starsaber_rel_error", "StarSaber (bridge init)", "tab:purple", "o", "-"),
        ("starsaber_random_init_rel_error", "StarSaber (random init)", "tab:pink", "o", ":"),
        ("jacobi_rel_error", "K Jacobi sweeps", SOLVER_COLOURS["picard"], "s", "-"),
        ("anderson_rel_error", "K Anderson steps", SOLVER_COLOURS["anderson"], "s", "-"),
        ("newton_rel_error", "K Newton steps", SOLVER_COLOURS["newton"], "s", "-"),
        ("banach_bound", "Banach a-priori bound (Jacobi)", "black", None, "--"),
    ]
    panels = data["panels"]
    figure = Figure(figsize=(5.2 * len(panels), 4.4), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    floor = 1e-16
    for axis, panel in zip(axes, panels):
        rows = panel["result"]["results"]
        depths = np.array([row["depth"] for row in rows])
        for key, label, colour, marker, style in series:
            values = [row[key] for row in rows]
            if all(value is None for value in values):
                continue
            shown = np.array([np.nan if v is None else max(v, floor) for v in values], dtype=float)
            axis.plot(depths, shown, color=colour, marker=marker, ls=style, lw=1.5, label=label)
        teacher = panel["result"]["teacher"]
        lipschitz = teacher["lipschitz_certified"]
        certified = "no certified L < 1" if lipschitz is None else f"certified L = {lipschitz:.3g}"
        axis.set_title(f"{panel['title']} ({certified})", fontsize=10)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("depth K (layers or steps)")
        axis.legend(fontsize=7)
    axes[0].set_ylabel("max_t,b ‖error‖₂ / max_t,b ‖S*‖₂ (held out)")
    settings = panels[0]["result"]["settings"]
    figure.suptitle(
        f"How closely depth-K models reach the exact fixed point: T = {settings['seq_len']}, "
        f"{settings['train_samples']} training / {settings['test_samples']} held-out sequences, "
        f"{settings['steps']} Adam steps per student, float64",
        fontsize=10,
    )
    _save(figure, path)
    return figure


def plot_paper_table(data: Mapping[str, Any], path: str | os.PathLike) -> Figure:
    """Held-out accuracy per dataset and model: one dot per seed, the mean as a bar.

    ``data`` as written by ``analysis/paper_table.py``: ``runs`` (each with ``dataset``,
    ``configuration``, ``seed``, ``accuracy``), ``summary`` (each with ``dataset``,
    ``configuration``, ``accuracy_mean``, ``parameters``) and ``metadata`` (``date``, ``device``).
    """
    summary = data["summary"]
    datasets = list(dict.fromkeys(row["dataset"] for row in summary))
    labels = list(dict.fromkeys(row["configuration"] for row in summary))
    colours = {label: f"C{index}" for index, label in enumerate(labels)}
    figure = Figure(figsize=(4.6 * len(datasets), 0.45 * len(labels) + 1.8), layout="constrained")
    axes = figure.subplots(1, len(datasets), squeeze=False, sharey=True)[0]
    positions = {label: len(labels) - 1 - index for index, label in enumerate(labels)}
    for axis, dataset in zip(axes, datasets):
        rows = [row for row in summary if row["dataset"] == dataset]
        means = [100 * row["accuracy_mean"] for row in rows]
        axis.barh([positions[row["configuration"]] for row in rows], means,
                  color=[colours[row["configuration"]] for row in rows], alpha=0.45, height=0.7)
        for run in data["runs"]:
            if run["dataset"] == dataset:
                axis.plot(100 * run["accuracy"], positions[run["configuration"]], "o", ms=3.5, color="black")
        for row, mean in zip(rows, means):
            axis.annotate(f"{mean:.1f} %  ({row['parameters'] / 1e3:.0f} k params)", (0.01, positions[row["configuration"]]),
                          xycoords=("axes fraction", "data"), va="center", fontsize=7)
        axis.set_xlim(0, 100)  # bars start at zero: a cut axis would exaggerate differences
        axis.set_title(dataset, fontsize=10)
        axis.set_xlabel("test accuracy (%)")
    axes[0].set_yticks([positions[label] for label in labels], labels, fontsize=8)
    meta = data["metadata"]
    figure.suptitle(f"StarSaber, Transformer, ReZero: test accuracy\n(bars: mean over seeds, dots: seeds; "
                    f"{meta['device']}, {meta['date'][:10]})", fontsize=10)
    _save(figure, path)
    return figure


CELL_COLOURS = {"elman-tanh": "tab:blue", "elman-relu": "tab:cyan", "gru": "tab:orange", "lstm": "tab:green"}


def plot_predictability(data: Mapping[str, Any], path: str | os.PathLike) -> Figure:
    """Predicted against observed iterations, one panel per method (log–log), the 2× band shaded.

    ``data["cases"]``: each with ``cell``, ``seed`` (0: fitting half, filled; 1: held out,
    hollow), ``seq_len``, ``predicted`` and ``observed`` (method → count, ``None`` when the solve
    did not converge: not drawn).  ``data["meta"]``: ``date``, ``platform``.
    """
    methods = list(data["cases"][0]["observed"]) if data["cases"] else []
    figure = Figure(figsize=(5.0 * max(len(methods), 1), 4.8), layout="constrained")
    axes = figure.subplots(1, max(len(methods), 1), squeeze=False)[0]
    for axis, method in zip(axes, methods):
        drawn = [c for c in data["cases"] if c["observed"][method] is not None]
        largest = max([max(c["observed"][method], c["predicted"][method]) for c in drawn], default=10)
        line = np.array([1, largest * 2])
        axis.fill_between(line, line / 2, line * 2, color="0.9", label="within 2×")
        axis.plot(line, line, color="0.5", lw=1)
        for cell, colour in CELL_COLOURS.items():
            for seed, face in ((0, colour), (1, "none")):
                rows = [c for c in drawn if c["cell"] == cell and c["seed"] == seed]
                if rows:
                    axis.scatter([c["observed"][method] for c in rows], [c["predicted"][method] for c in rows],
                                 s=22, facecolors=face, edgecolors=colour,
                                 label=f"{cell}{' (held out)' if seed else ''}")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlim(1, largest * 2)
        axis.set_ylim(1, largest * 2)
        axis.set_xlabel("observed iterations")
        axis.set_title(method, fontsize=10)
    axes[0].set_ylabel("predicted iterations (estimate)")
    axes[-1].legend(fontsize=7, loc="lower right")
    meta = data.get("meta", {})
    figure.suptitle(
        "Iterations predicted from the largest Lyapunov exponent's window growth, against observed; "
        f"synthetic suite, {meta.get('platform', 'CPU')}, {meta.get('date', '')[:10]}",
        fontsize=9,
    )
    _save(figure, path)
    return figure


__all__ += ["plot_predictability"]


def plot_trained_networks(data: Mapping[str, Any], path: str | os.PathLike) -> Figure:
    """Per trained network: the growth ``g_t`` along the solution (left, with its 50-step mean),
    and per dtype the observed iterations of every solver beside the predictions (right).

    ``data["networks"]``: each with ``name`` and ``problems``: ``dtype``, ``seq_len``, ``growth``
    (one sample's ``g_t``), ``lyapunov``, ``predicted`` (method → count) and ``runs`` (``solver``,
    ``iterations``, ``converged``).
    """
    networks = data["networks"]
    figure = Figure(figsize=(12, 4.2 * len(networks)), layout="constrained")
    axes = figure.subplots(len(networks), 2, squeeze=False)
    for row, network in zip(axes, networks):
        growth_axis, count_axis = row
        first = network["problems"][0]
        growth = np.asarray(first["growth"], dtype=float)
        growth_axis.plot(np.arange(1, growth.size + 1), growth, lw=0.6, color="0.6", label="g_t = log ‖J_t v_{t−1}‖")
        if growth.size >= 50:
            window = np.convolve(growth, np.ones(50) / 50, mode="valid")
            growth_axis.plot(np.arange(50, growth.size + 1), window, lw=1.6, color="tab:blue", label="50-step mean")
        growth_axis.axhline(0, color="k", lw=0.8)
        growth_axis.set_xlabel("step t")
        growth_axis.set_ylabel("log growth per step (estimate)")
        growth_axis.set_title(f"{network['name']}: λ ≈ {max(first['lyapunov']):+.4f}/step ({first['dtype']})", fontsize=9)
        growth_axis.legend(fontsize=8)
        labels, width = [], 0.8 / (2 * len(network["problems"]))
        for index, problem in enumerate(network["problems"]):
            runs = problem["runs"]
            labels = [run["solver"] for run in runs]
            positions = np.arange(len(runs))
            observed = [run["iterations"] for run in runs]
            predicted = [problem["predicted"].get(run["solver"], np.nan) for run in runs]
            offset = (2 * index - len(network["problems"]) + 0.5) * width
            count_axis.bar(positions + offset, observed, width, label=f"observed, {problem['dtype']}",
                           color=["tab:blue", "tab:orange"][index % 2],
                           hatch=["" if run["converged"] else "//" for run in runs])
            count_axis.bar(positions + offset + width, predicted, width, label=f"predicted, {problem['dtype']}",
                           color=["tab:blue", "tab:orange"][index % 2], alpha=0.35)
        count_axis.axhline(first["seq_len"], color="k", lw=0.8, ls="--", label=f"T = {first['seq_len']}")
        count_axis.set_xticks(np.arange(len(labels)), labels, fontsize=8, rotation=30, ha="right")
        count_axis.set_yscale("log")
        count_axis.set_ylabel("iterations (hatched: not converged)")
        count_axis.legend(fontsize=7, loc="lower left")
    meta = data.get("meta", {})
    figure.suptitle(f"Trained networks on real inputs (speech, word lists); {meta.get('platform', 'CPU')}, {meta.get('date', '')[:10]}",
                    fontsize=9)
    _save(figure, path)
    return figure


__all__ += ["plot_trained_networks"]
