"""How closely StarSaber approximates a recurrent network's exact fixed point, depth by depth.

The teacher is one Elman or GRU cell; its exact solution ``S*`` on held-out inputs is the
target.  For each depth ``K`` this module trains two StarSaber students to ``S*`` — one from the
bridge initialisation (:meth:`StarSaber.from_cell` with softmax attention, which starts at ``K``
Jacobi sweeps) and one from a random initialisation — and sets their held-out error beside
``K`` Jacobi sweeps, ``K`` Anderson steps, ``K`` Newton steps and Banach's a-priori bound for
``K`` sweeps.

Error measure, the same for every column: ``max_{t,b} ‖A_{t,b} − S*_{t,b}‖₂ / max_{t,b} ‖S*_{t,b}‖₂``,
the norm in which the certified contraction constant ``L`` bounds Jacobi:
``max_t ‖S^K_t − S*_t‖ ≤ L^K/(1 − L) · max_t ‖S^1_t − S^0_t‖``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor

from fixedpoint.cells import Cell, ElmanCell, GRUCell
from fixedpoint.contraction import analyze
from fixedpoint.errors import InputError
from fixedpoint.solve import solve
from fixedpoint.solvers import Anderson, Newton
from fixedpoint.solvers.base import check_integer, check_number
from fixedpoint.starsaber import StarSaber, check_sequence_inputs
from fixedpoint.system import SequenceSystem

#: ``progress(label, step, total)``: called while a student trains.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ApproxSettings:
    """What to measure.

    Attributes:
        depths: the depths ``K`` (StarSaber layers, solver steps).
        seq_len: ``T`` of every sequence.
        train_samples, test_samples: sequences to train on and to measure on (held out).
        steps: Adam steps per student (full batch).
        learning_rate: Adam's learning rate.
        num_heads: StarSaber's attention heads.
        seed: inputs use ``seed``, the random students ``seed + 1``.
    """

    depths: tuple[int, ...] = (1, 2, 4, 8)
    seq_len: int = 64
    train_samples: int = 256
    test_samples: int = 64
    steps: int = 300
    learning_rate: float = 3e-3
    num_heads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.depths, tuple) or not self.depths:
            raise InputError(f"depths must be a non-empty tuple of positive integers, got {self.depths!r}")
        for depth in self.depths:
            check_integer("every depth", depth)
        for name in ("seq_len", "train_samples", "test_samples", "steps", "num_heads"):
            check_integer(name, getattr(self, name))
        check_number("learning_rate", self.learning_rate, 0, low_open=True)
        check_integer("seed", self.seed, 0)


@dataclass
class DepthResult:
    """One depth ``K``: errors (module docstring), model sizes, and training time.

    ``None`` where a number does not exist (``banach_bound`` without a certified ``L < 1``).
    """

    depth: int
    starsaber_rel_error: float
    starsaber_random_init_rel_error: float
    starsaber_max_abs_error: float
    jacobi_rel_error: float
    anderson_rel_error: float
    newton_rel_error: float
    banach_bound: float | None
    starsaber_parameters: int
    starsaber_flops_per_token: float
    jacobi_flops_per_token: int
    train_seconds: float


def relative_error(approximation: Tensor, exact: Tensor) -> float:
    """``max_{t,b} ‖A − S*‖₂ / max_{t,b} ‖S*‖₂`` over ``(T, B, H)`` tensors."""
    return float((approximation - exact).norm(dim=-1).max() / exact.norm(dim=-1).max().clamp(min=1e-300))


def teacher_step_flops(cell: Cell) -> int:
    """Multiply–adds × 2 of one step ``f(s, x)`` per token (matrix products only)."""
    return 2 * cell.gate_count * cell.hidden_size * (cell.hidden_size + cell.input_size)


def starsaber_flops_per_token(model: StarSaber, seq_len: int) -> float:
    """Matrix-product FLOPs per token of ``model`` on sequences of ``seq_len``, dense attention as
    implemented: ``T + 1`` key positions (``h_0`` included) whose keys and values are computed
    once per sequence, every query scored against all of them (causal masking included)."""
    total = 0.0
    keys = seq_len + 1
    per_query = keys / seq_len  # keys and values: T + 1 positions shared by T queries
    for layer in model.layers:
        hidden, inputs = layer.hidden_size, layer.input_size
        rows = layer.before.shape[0]  # G·H
        matrices = 1 if layer.after_matrix is None else 2
        total += matrices * (2 * rows * hidden * per_query + 2 * keys * rows)  # values and their aggregation
        if layer.input_weight is not None:
            total += 2 * rows * inputs
        if layer.variant == "gated":
            total += 2 * keys * hidden  # the carried state's average
        if layer.attention == "softmax":
            projection = 2 * hidden * (hidden + inputs)
            total += projection + projection * per_query + 2 * keys * hidden  # queries, keys, scores
    return total


def _sweeps(system: SequenceSystem, count: int) -> list[Tensor]:
    states = torch.zeros(system.state_shape, dtype=system.inputs.dtype, device=system.inputs.device)
    out = []
    for _ in range(count):
        states = system.apply(states)
        out.append(states)
    return out


def check_teacher(cell: Cell) -> None:
    """Raise :class:`InputError` unless ``cell`` is an Elman or GRU cell (StarSaber's variants)."""
    if not isinstance(cell, (ElmanCell, GRUCell)):
        raise InputError(f"the teacher must be an Elman or GRU cell (StarSaber's two variants), not {getattr(cell, 'kind', cell)!r}")


def check_student(cell: Cell, student: StarSaber) -> None:
    """Raise :class:`InputError` unless ``student`` can be trained to ``cell``'s states: a
    time-major StarSaber with the teacher's input and hidden sizes."""
    check_teacher(cell)
    if not isinstance(student, StarSaber):
        raise InputError(f"the student must be a fixedpoint.starsaber.StarSaber, got {type(student).__name__}")
    if student.batch_first:
        raise InputError("the student must be time-major (batch_first=False), as the teacher's states (T, B, H) are")
    for name in ("input_size", "hidden_size"):
        if getattr(student, name) != getattr(cell, name):
            raise InputError(
                f"teacher and student sizes differ: the {cell.kind} teacher has {name}={getattr(cell, name)}, "
                f"the student {getattr(student, name)}; build the student with StarSaber.from_cell(cell, depth) "
                f"or with the teacher's sizes"
            )


def check_student_data(model: StarSaber, inputs: Tensor, target: Tensor, initial_state: Tensor) -> None:
    """Raise :class:`InputError` unless ``inputs (T, B, I)``, ``target (T, B, H)`` and
    ``initial_state (B, H)`` fit ``model`` and each other."""
    check_sequence_inputs(inputs, model.input_size)
    steps, batch, _ = inputs.shape
    if tuple(target.shape) != (steps, batch, model.hidden_size):
        raise InputError(
            f"target must have shape (T, B, H) = ({steps}, {batch}, {model.hidden_size}) to match the inputs and the "
            f"student, got {tuple(target.shape)}"
        )
    if tuple(initial_state.shape) != (batch, model.hidden_size):
        raise InputError(f"initial_state must have shape (B, H) = ({batch}, {model.hidden_size}), got {tuple(initial_state.shape)}")


def distill(
    cell: Cell,
    student: StarSaber,
    inputs: Tensor,
    settings: ApproxSettings = ApproxSettings(),
    initial_state: Tensor | None = None,
    progress: Progress | None = None,
) -> float:
    """Train a user's ``student`` (same sizes as ``cell``) to the teacher's exact states on
    ``inputs (T, B, I)`` from ``initial_state (B, H)`` (zeros when ``None``), with
    ``settings.steps`` and ``settings.learning_rate``; returns the student's relative error on
    those inputs (module docstring's measure). Inputs, state and student are moved to the
    teacher's dtype and device."""
    check_student(cell, student)
    check_sequence_inputs(inputs, cell.input_size)
    inputs = inputs.to(dtype=cell.dtype, device=cell.device)  # the teacher's dtype and device throughout
    if initial_state is None:
        initial_state = inputs.new_zeros(inputs.shape[1], cell.hidden_size)
    initial_state = initial_state.to(dtype=cell.dtype, device=cell.device)
    student.to(dtype=cell.dtype, device=cell.device)
    exact = SequenceSystem.build(cell, inputs, initial_state).sequential()
    train_student(student, inputs, exact, initial_state, settings, progress, "student")
    with torch.no_grad():
        output, _ = student(inputs, initial_state)
    return relative_error(output, exact)


def train_student(
    model: StarSaber,
    inputs: Tensor,
    target: Tensor,
    initial_state: Tensor,
    settings: ApproxSettings,
    progress: Progress | None = None,
    label: str = "",
) -> float:
    """Full-batch Adam on the mean squared error to ``target (T, B, H)``; returns seconds.

    The model keeps the parameters with the lowest training loss seen, its starting point
    included: Adam's first steps have the size of the learning rate whatever the gradient, and
    can leave a good initialisation (the bridge) worse than they found it.
    """
    check_student_data(model, inputs, target, initial_state)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    started = time.perf_counter()
    best_loss, best_state = float("inf"), None
    for step in range(settings.steps + 1):
        optimizer.zero_grad()
        output, _ = model(inputs, initial_state)
        loss = (output - target).square().mean()
        if float(loss.detach()) < best_loss:  # the loss of the parameters before this step
            best_loss = float(loss.detach())
            best_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        if step == settings.steps:
            break
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(label, step + 1, settings.steps)
    if best_state is not None:
        model.load_state_dict(best_state)
    return time.perf_counter() - started


def run_approx(cell: Cell, settings: ApproxSettings = ApproxSettings(), progress: Progress | None = None) -> dict:
    """The measurement of the module docstring for one teacher ``cell`` (Elman or GRU).

    Returns one JSON-ready object: ``settings``, ``teacher`` (kind, sizes, certified ``L``) and
    ``results``, one :class:`DepthResult` per depth.
    """
    # Long on purpose: one study in order (draw the data, solve the teacher, train a student per
    # depth, the baselines), whose steps share the drawn data.
    check_teacher(cell)
    cell = cell.to(dtype=torch.float64)
    generator = torch.Generator().manual_seed(settings.seed)

    def draw(samples: int) -> Tensor:
        return torch.randn(settings.seq_len, samples, cell.input_size, generator=generator, dtype=torch.float64).to(cell.device)

    train_inputs, test_inputs = draw(settings.train_samples), draw(settings.test_samples)
    zeros = lambda samples: torch.zeros(samples, cell.hidden_size, dtype=torch.float64, device=cell.device)  # noqa: E731
    train_system = SequenceSystem.build(cell, train_inputs)
    test_system = SequenceSystem.build(cell, test_inputs)
    train_exact, test_exact = train_system.sequential(), test_system.sequential()
    report = analyze(test_system, "2", atol=1e-12)
    lipschitz = report.certified
    sweeps = _sweeps(test_system, max(settings.depths))
    first_step = float(sweeps[0].norm(dim=-1).max())  # max_t ‖S^1_t − S^0_t‖ with S^0 = 0
    scale = float(test_exact.norm(dim=-1).max())
    results = []
    for depth in settings.depths:
        anderson = solve(test_system, Anderson(), max_steps=depth, throw=False).value
        newton = solve(test_system, Newton(), max_steps=depth, throw=False).value
        bridged = StarSaber.from_cell(cell, depth, num_heads=settings.num_heads, attention="softmax", max_len=settings.seq_len)
        torch.manual_seed(settings.seed + 1)
        random = StarSaber(
            cell.input_size, cell.hidden_size, depth, num_heads=settings.num_heads, variant=bridged.layers[0].variant,
            nonlinearity=bridged.layers[0].nonlinearity, max_len=settings.seq_len,
        ).to(dtype=torch.float64, device=cell.device)
        seconds = 0.0
        errors = {}
        for name, model in (("bridge", bridged), ("random", random)):
            seconds += train_student(
                model, train_inputs, train_exact, zeros(settings.train_samples), settings, progress, f"depth {depth}, {name} init"
            )
            with torch.no_grad():
                output, _ = model(test_inputs, zeros(settings.test_samples))
            errors[name] = output
        banach = None
        if lipschitz is not None and scale > 0:
            banach = lipschitz**depth / (1 - lipschitz) * first_step / scale
        results.append(
            DepthResult(
                depth=depth,
                starsaber_rel_error=relative_error(errors["bridge"], test_exact),
                starsaber_random_init_rel_error=relative_error(errors["random"], test_exact),
                starsaber_max_abs_error=float((errors["bridge"] - test_exact).abs().max()),
                jacobi_rel_error=relative_error(sweeps[depth - 1], test_exact),
                anderson_rel_error=relative_error(anderson, test_exact),
                newton_rel_error=relative_error(newton, test_exact),
                banach_bound=banach,
                starsaber_parameters=sum(p.numel() for p in bridged.parameters()),
                starsaber_flops_per_token=starsaber_flops_per_token(bridged, settings.seq_len),
                jacobi_flops_per_token=depth * teacher_step_flops(cell),
                train_seconds=seconds,
            )
        )
    teacher = {
        "cell": cell.kind if not isinstance(cell, ElmanCell) else f"elman({cell.nonlinearity})",
        "input_size": cell.input_size,
        "hidden_size": cell.hidden_size,
        "lipschitz_certified": lipschitz,
        "lipschitz_estimated": float(analyze(test_system, "2", atol=1e-12, states=test_exact).estimated or 0.0),
        "verdict": report.verdict,
    }
    return {"settings": asdict(settings), "teacher": teacher, "results": [asdict(r) for r in results]}
