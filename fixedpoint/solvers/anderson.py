"""Anderson acceleration (type II, Walker & Ni 2011) over the whole sequence, per sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fixedpoint.solvers.base import Solver, check_integer, check_number, counted
from fixedpoint.system import SequenceSystem


@dataclass
class AndersonState:
    """History of images ``G_i`` and residuals ``R_i = G_i − X_i`` (oldest first), each
    ``(n_i, B, S)`` on the active window of its iteration, and per-sample safeguard counts."""

    images: list[Tensor] = field(default_factory=list)
    residuals: list[Tensor] = field(default_factory=list)
    plain_steps: Tensor | None = None  # (B,) how often each sample fell back to a plain step
    accelerated_steps: Tensor | None = None  # (B,)


@dataclass(frozen=True)
class Anderson(Solver):
    """Anderson acceleration with separate least-squares coefficients for every batch sample.

    With ``m_k = min(memory, k)`` differences ``ΔR`` of past residuals and ``ΔG`` of past
    images, solve ``γ = argmin ‖R_k − ΔR γ‖² + (λ/m)‖ΔR‖_F²‖γ‖²`` per sample and step
    ``X ← X_k + β R_k − (ΔG − ΔR + β ΔR) γ`` (``β = mixing``; with ``β = 1``, ``G_k − ΔG γ``).

    Safeguard: a sample takes the plain step ``X_k + β R_k`` (``γ = 0``) when its regularised
    normal matrix has condition number above ``max_condition`` or is not finite, or when its
    residual norm grew by more than ``max_residual_growth`` since the previous iteration.  Both
    are counted per sample in the statistics (``plain_steps``).

    Args:
        rtol, atol: termination tolerances (see :class:`~fixedpoint.solvers.base.Solver`).
        memory: number of past differences used, ``m ≥ 1``.
        regularization: relative Tikhonov weight ``λ ≥ 0``.
        mixing: ``β ∈ (0, 1]``.
        max_condition: largest accepted condition number of the normal matrix; ``None`` means
            ``0.01 / eps`` of the dtype (4.5e13 in float64, 8.4e4 in float32).
        max_residual_growth: factor ``≥ 1`` on the previous residual norm beyond which the
            accelerated step is rejected.
    """

    memory: int = 5
    regularization: float = 0.0
    mixing: float = 1.0
    max_condition: float | None = None
    max_residual_growth: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_integer("memory", self.memory)
        check_number("regularization", self.regularization, 0)
        check_number("mixing", self.mixing, 0, 1, low_open=True, hint="; 1 is undamped Anderson")
        if self.max_condition is not None:
            check_number("max_condition", self.max_condition, 1, low_open=True, hint="; None means 0.01/eps")
        check_number("max_residual_growth", self.max_residual_growth, 1)

    def init(self, system, initial_guess: Tensor) -> tuple[Tensor, AndersonState]:
        zeros = torch.zeros(system.batch, dtype=torch.long, device=initial_guess.device)
        return initial_guess, AndersonState(plain_steps=zeros, accelerated_steps=zeros.clone())

    def step(
        self,
        system: SequenceSystem,
        iterate: Tensor,
        image: Tensor,
        state: AndersonState,
        predecessor: Tensor | None = None,
        active: Tensor | None = None,
    ) -> tuple[Tensor, AndersonState]:
        window = iterate.shape[0]
        residual = image - iterate
        # Windows are suffixes of the sequence: align the history by keeping its last `window` rows.
        images = [g[-window:] for g in state.images] + [image]
        residuals = [r[-window:] for r in state.residuals] + [residual]
        plain = iterate + self.mixing * residual
        if len(images) == 1:
            next_iterate = plain
        else:
            next_iterate = self._accelerated(iterate, residual, plain, images, residuals, state, active)
        state.images = images[-self.memory :]
        state.residuals = residuals[-self.memory :]
        return next_iterate, state

    def _accelerated(
        self,
        iterate: Tensor,
        residual: Tensor,
        plain: Tensor,
        images: list[Tensor],
        residuals: list[Tensor],
        state: AndersonState,
        active: Tensor | None,
    ) -> Tensor:
        batch = iterate.shape[1]
        delta_r = torch.stack([b - a for a, b in zip(residuals[:-1], residuals[1:])])  # (m, n, B, S)
        delta_g = torch.stack([b - a for a, b in zip(images[:-1], images[1:])])
        # Per-sample least squares: columns are the m differences, flattened over (n, S).
        columns = delta_r.permute(2, 0, 1, 3).reshape(batch, delta_r.shape[0], -1)  # (B, m, n·S)
        target = residual.permute(1, 0, 2).reshape(batch, -1)  # (B, n·S)
        gram = columns @ columns.transpose(1, 2)  # (B, m, m)
        rhs = (columns @ target.unsqueeze(-1)).squeeze(-1)  # (B, m)
        m = gram.shape[-1]
        eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
        trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
        regularized = gram + (self.regularization * trace / m)[:, None, None] * eye
        finite = torch.isfinite(regularized).flatten(1).all(1) & torch.isfinite(rhs).all(1)
        # Huge (finite) states can overflow the normal matrix; such samples take a plain step.
        regularized = torch.where(finite[:, None, None], regularized, eye.expand_as(regularized))
        eigenvalues = torch.linalg.eigvalsh(regularized)
        max_condition = self.max_condition or 0.01 / torch.finfo(gram.dtype).eps
        well_posed = (eigenvalues[:, 0] > 0) & (eigenvalues[:, -1] <= max_condition * eigenvalues[:, 0])
        well_posed &= finite
        previous = residuals[-2].permute(1, 0, 2).reshape(batch, -1)
        growing = target.norm(dim=-1) > self.max_residual_growth * previous.norm(dim=-1)
        accept = well_posed & ~growing
        # Solve only where well posed; elsewhere solve the identity to keep the batch intact.
        safe_matrix = torch.where(well_posed[:, None, None], regularized, eye.expand_as(regularized))
        gamma = torch.linalg.solve(safe_matrix, rhs.unsqueeze(-1)).squeeze(-1)  # (B, m)
        gamma = torch.where(accept[:, None], gamma, torch.zeros_like(gamma))
        # ΔX + β ΔR = ΔG − (1 − β) ΔR
        correction_basis = delta_g if self.mixing == 1 else delta_g - (1 - self.mixing) * delta_r
        correction = torch.einsum("mnbs,bm->nbs", correction_basis, gamma)
        state.plain_steps += counted(~accept, active)
        state.accelerated_steps += counted(accept, active)
        return plain - correction

    def statistics(self, state: AndersonState) -> dict[str, Any]:
        return {
            "plain_steps": state.plain_steps.tolist(),
            "accelerated_steps": state.accelerated_steps.tolist(),
        }

