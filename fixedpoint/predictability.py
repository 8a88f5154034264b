"""How predictable a trajectory is, and what that says about iteration counts (estimates).

Every parallel method propagates information along the sequence through products of the cell
Jacobians ``J_t ⋯ J_{k+1}``: Picard moves its error one position per sweep and shrinks it by those
products, and the Newton family's merit function is conditioned by their sums (Gonzalez et al.,
2025, "Predictability enables parallelization of nonlinear state space models").  Their growth
rate along the trajectory is the largest Lyapunov exponent (LLE)

    ``λ = lim (1/T) log ‖J_T ⋯ J_1 v‖``,

measured here by renormalised products of one vector (matrix-free ``J v``, no ``S × S``
matrices): ``g_t = log ‖J_t v_{t−1}‖``, ``v_t = J_t v_{t−1} / ‖J_t v_{t−1}‖``, ``λ ≈ mean(g_t)``
after a burn-in.  Windowed sums of ``g_t`` are finite-time exponents; ``1/|λ|`` is the memory
length.  Per-step norms ``‖J_t‖`` multiply to vacuous numbers on trained networks, where the
products themselves stay near 1: this measures the products.

Everything here is an **estimate**, named so wherever it is shown: one direction's growth, along
one trajectory, to first order.  The iteration model and its measured error: docs/predictability.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fixedpoint.conditioning import Trajectory
from fixedpoint.errors import InputError
from fixedpoint.solvers.base import check_integer
from fixedpoint.system import SequenceSystem

#: Positions whose Jacobian factors are formed at once (bounds the float64 temporaries).
CHUNK = 1024

#: Steps at the start whose growth is left out of ``λ``: the vector needs them to align with the
#: most expanding direction (it is random at ``t = 0``).
BURN_IN = 20

#: ``log`` of the smallest positive float64: a step whose product is zero (``g_t = −inf``) counts
#: as this much contraction in sums of ``g_t``, which keeps them finite.
LOG_SMALLEST = math.log(2.0**-1074)

#: Positions of the input the sequential loop runs to estimate before solving.
DEFAULT_PREFIX = 256


@dataclass(frozen=True)
class IterationModel:
    """Predicted iterations from the Picard prediction ``P`` (docs/predictability.md).

    ``clamp(round(a · P^b), 1, T)`` with ``(a, b)`` per cell kind and method, except where the
    trajectory is not predictable: ``P`` reaches ``T`` *and* some window of 50 steps does not
    shrink a perturbation (``max_window_growth ≥ 1``).  There ``P`` says no more, and the count
    is a measured fraction of ``T`` per method and dtype (:attr:`unpredictable`).  Picard's own
    is ``P``.

    The coefficients were fitted by least squares in log space on the synthetic suite of
    ``analysis/predictability.py`` (random and scaled weights; seed 0), which re-fits them on
    every run and reports the accuracy of these, the shipped ones, on both halves of the suite.
    """

    coefficients: dict[str, dict[str, tuple[float, float]]]
    unpredictable: dict[str, dict[torch.dtype, float]]

    def predict(
        self, picard: Tensor, steps: int, kind: str, dtype: torch.dtype = torch.float64,
        window_growth: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Method → ``(B,)`` predicted iterations for a cell of ``kind`` at length ``steps``, from
        ``picard (B,)`` and ``window_growth (B,)`` (:attr:`Predictability.max_window_growth`;
        ``None``: every window shrinks)."""
        if kind not in self.coefficients:
            raise InputError(f"no iteration model for cell kind {kind!r}; known: {sorted(self.coefficients)}")
        out = {"picard": picard.clamp(1, steps).long()}
        saturated = picard >= steps
        if window_growth is None:
            saturated = torch.zeros_like(saturated)
        else:
            saturated = saturated & (window_growth.to(picard.device) >= 1)
        for method, (scale, power) in self.coefficients[kind].items():
            fitted = (scale * picard.double().clamp(min=1) ** power).round()
            fraction = self.unpredictable.get(method, {}).get(dtype, 1.0)
            fitted = torch.where(saturated, torch.full_like(fitted, math.ceil(fraction * steps)), fitted)
            out[method] = fitted.clamp(1, steps).long()
        return out


#: Fitted by ``analysis/predictability.py`` on 2026-12-01 (docs/predictability.md).
MODEL = IterationModel(
    coefficients={
        "elman": {"quasi-newton": (0.7855, 1.094), "newton": (1.3872, 0.405)},
        "gru": {"quasi-newton": (0.146, 1.204), "newton": (1.3442, 0.324)},
        "lstm": {"quasi-newton": (0.1088, 1.276), "newton": (0.9368, 0.426)},
    },
    # Not predictable (P reaches T, a 50-step window does not shrink): undamped Newton took 0.2–0.5 T in float64 and ~T in float32 (elman ×2–3).
    unpredictable={"newton": {torch.float64: 0.3, torch.float32: 1.0}},
)


@dataclass
class Predictability:
    """Predictability of one (layer, direction) trajectory, per sample.  All estimates.

    Attributes:
        growth: ``(T, B)`` ``g_t = log ‖J_t v_{t−1}‖`` along the renormalised vector.
        lyapunov: ``(B,)`` the largest Lyapunov exponent per step, ``mean(g_t)`` after the burn-in
            (< 0: perturbations die out, the system is predictable).
        memory_length: ``(B,)`` ``1/|λ|`` steps (``inf`` at ``λ = 0``).
        max_window_growth: ``(B,)`` the largest ``exp(Σ g_t)`` over windows of ``window`` steps:
            how much a perturbation grows at most over that span.
        window: the window of ``max_window_growth``.
        picard: ``(B,)`` predicted Picard iterations from zero at this ``T`` and tolerance.
        predicted_iterations: method → ``(B,)`` predicted iterations (:class:`IterationModel`).
        measured_steps: positions the estimate was measured on (all ``T``, or a prefix).
        seq_len: the ``T`` the predictions are for.
    """

    growth: Tensor
    lyapunov: Tensor
    memory_length: Tensor
    max_window_growth: Tensor
    window: int
    picard: Tensor
    predicted_iterations: dict[str, Tensor]
    measured_steps: int
    seq_len: int

    def summary(self) -> dict[str, object]:
        """Batch-wide numbers for reports: the least predictable sample's."""
        return {
            "lyapunov_exponent": float(self.lyapunov.max()),
            "memory_length": float(self.memory_length.max()),
            "max_window_growth": float(self.max_window_growth.max()),
            "window": self.window,
            "predicted_iterations": {m: int(v.max()) for m, v in self.predicted_iterations.items()},
            "measured_steps": self.measured_steps,
        }


def growth_rates(system: SequenceSystem, states: Tensor, *, seed: int = 0, chunk: int = CHUNK) -> Tensor:
    """``(T, B)`` float64: ``g_t = log ‖J_t v_{t−1}‖₂`` along ``states (T, B, S)``, ``v_0`` a
    random unit vector per sample (from ``seed``), renormalised every step.  ``g_t = −inf`` where
    ``J_t v_{t−1} = 0`` (every perturbation dies there); the next step starts from a fresh
    random direction."""
    with torch.no_grad():
        steps, batch, size = states.shape
        generator = torch.Generator(device="cpu").manual_seed(seed)
        vector = torch.randn(batch, size, generator=generator, dtype=torch.float64).to(states.device)
        vector = vector / vector.norm(dim=-1, keepdim=True)
        growth = vector.new_empty(steps, batch)
        for start, piece in Trajectory.chunks(system, states, chunk):
            factors = piece.factors()
            for t in range(piece.states.shape[0]):
                vector = piece.cell.jacobian_product(tuple(f[t] for f in factors), vector)
                norm = vector.norm(dim=-1)
                growth[start + t] = torch.log(norm)  # −inf where the product is zero
                # A zero product (a relu layer with every unit off) ends all memory: the sample
                # restarts from a fresh random direction.
                dead = norm == 0
                if bool(dead.any()):
                    fresh = torch.randn(batch, size, generator=generator, dtype=torch.float64).to(states.device)
                    vector = torch.where(dead.unsqueeze(-1), fresh, vector)
                    norm = torch.where(dead, fresh.norm(dim=-1), norm)
                vector = vector / norm.unsqueeze(-1)
    return growth


def predictability(
    system: SequenceSystem,
    states: Tensor | None = None,
    *,
    rtol: float,
    atol: float,
    prefix: int = DEFAULT_PREFIX,
    window: int = 50,
    seed: int = 0,
    model: IterationModel = MODEL,
) -> Predictability:
    """Estimate the predictability of ``system`` and the iterations each method needs.

    Args:
        system: the equation system.
        states: ``(T, B, S)`` a solved trajectory, or ``(P, B, S)`` its first ``P < T``
            positions; ``None`` runs the sequential loop on the first ``prefix`` positions
            (cheap, before solving).  Growth measured on fewer than ``T`` positions is extended
            periodically to ``T`` for the predictions.
        rtol, atol: the tolerance the predictions are for (the driver's test).
        window: span of :attr:`Predictability.max_window_growth`.
        seed: the random start vector.
    """
    # Long mostly by its docstring; the body is a prefix solve, the growth rates, their statistics
    # and the model's prediction, in order.
    check_integer("prefix", prefix)
    check_integer("window", window)
    steps = system.seq_len
    if states is None:
        measured = min(prefix, steps)
        head = SequenceSystem(system.cell, system.inputs[:measured], system.initial_state)
        states = head.sequential()
    else:
        measured = states.shape[0] if states.dim() == 3 else -1
        if not 1 <= measured <= steps or tuple(states.shape[1:]) != system.state_shape[1:]:
            raise InputError(f"states must have shape (P, B, S) with P ≤ T for {system.state_shape}, "
                             f"got {tuple(states.shape)}")
        head = SequenceSystem(system.cell, system.inputs[:measured], system.initial_state)
    if not bool(torch.isfinite(states).all()):
        raise InputError("states must be finite: there is no Lyapunov exponent along an overflowed trajectory")
    growth = growth_rates(head, states, seed=seed)
    bounded = growth.clamp(min=LOG_SMALLEST)  # a zero product: the most contraction a float64 can hold
    burn = min(BURN_IN, max(measured - 1, 0))
    settled = bounded[burn:] if measured > burn else bounded
    lyapunov = settled.mean(0) if settled.shape[0] else growth.new_zeros(growth.shape[1])
    memory = torch.where(lyapunov != 0, 1 / lyapunov.abs(), torch.full_like(lyapunov, math.inf))
    span = min(window, measured)
    cumulative = torch.cat((growth.new_zeros(1, growth.shape[1]), bounded.cumsum(0)))
    window_growth = torch.exp((cumulative[span:] - cumulative[:-span]).amax(0))
    # Predictions for the full T: the measured growth, extended periodically past a prefix.
    repeats = math.ceil(steps / measured)
    full_growth = growth.repeat(repeats, 1)[:steps]
    state_size = states.abs().amax(dim=2)  # (measured, B): |s_t|_∞
    full_states = state_size.repeat(repeats, 1)[:steps].double()
    picard = _picard_iterations(full_growth, full_states, rtol, atol)
    return Predictability(
        growth=growth,
        lyapunov=lyapunov,
        memory_length=memory,
        max_window_growth=window_growth,
        window=span,
        picard=picard,
        predicted_iterations=model.predict(picard, steps, system.cell.kind, system.cell.dtype, window_growth),
        measured_steps=measured,
        seq_len=steps,
    )


def _picard_iterations(growth: Tensor, state_size: Tensor, rtol: float, atol: float) -> Tensor:
    """``(B,)``: the smallest ``k`` with ``max_t exp(Σ_{u=t−k+1..t} g_u)·|s*_{t−k}| < tol_t`` — the
    linearised error of ``k`` Picard sweeps from zero along the renormalised direction — plus the
    driver's one iteration that observes it; at most ``T`` (finite termination)."""
    steps, batch = growth.shape
    log_growth = growth.clamp(min=LOG_SMALLEST)
    cumulative = torch.cat((log_growth.new_zeros(1, batch), log_growth.cumsum(0)))  # (T + 1, B)
    log_start = torch.log(state_size.clamp(min=1e-300))  # the error of S⁰ = 0 is the solution
    log_tolerance = torch.log(atol + rtol * state_size).clamp(min=LOG_SMALLEST)
    predicted = torch.full((batch,), steps, dtype=torch.long, device=growth.device)
    pending = torch.ones(batch, dtype=torch.bool, device=growth.device)
    for k in range(1, steps):
        # error at t ≥ k after k sweeps: Σ_{u=t−k+1..t} g_u + log|s*_{t−k}|   (arrays from 0)
        window = cumulative[k + 1 :] - cumulative[1 : steps - k + 1]
        margin = (window + log_start[: steps - k] - log_tolerance[k:]).amax(0)
        done = pending & (margin < 0)
        predicted[done] = min(k + 1, steps)
        pending &= ~done
        if not bool(pending.any()):
            break
    return predicted
