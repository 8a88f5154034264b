"""Anderson's update rule on a generic contraction, away from the recurrent structure.

On a sequence system the Jacobi error travels as a wavefront that Anderson cannot extrapolate
(figures/picard_wavefront.png), so iteration counts there say little about whether the
acceleration itself is right.  On a symmetric linear contraction it must beat Picard by far.
"""

from __future__ import annotations

import torch

from fixedpoint.solvers import Anderson


def linear_problem(size: int, batch: int, radius: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``M`` symmetric with eigenvalues in ``[−radius, radius]`` and ``b`` per sample, as ``(1, B, S)``."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    eigenvalues = (torch.rand(size, generator=generator, dtype=torch.float64) * 2 - 1) * radius
    eigenvalues[0] = radius  # the slowest mode is present
    matrix = basis @ torch.diag(eigenvalues) @ basis.T
    offsets = torch.randn(1, batch, size, generator=generator, dtype=torch.float64)
    return matrix, offsets


def iterate(solver: Anderson | None, matrix: torch.Tensor, offsets: torch.Tensor, steps: int) -> tuple[list[float], object]:
    """Run ``x ← step(x, Mx + b)`` (Picard when ``solver`` is None); return the error history."""
    exact = torch.linalg.solve(torch.eye(matrix.shape[0], dtype=matrix.dtype) - matrix, offsets[0].T).T[None]
    x = torch.zeros_like(offsets)
    state = None
    system = type("System", (), {"batch": offsets.shape[1]})()  # all Anderson reads of a system
    if solver is not None:
        _, state = solver.init(system, x)
    errors = []
    for _ in range(steps):
        image = x @ matrix.T + offsets
        x = image if solver is None else solver.step(system, x, image, state)[0]
        errors.append(float((x - exact).abs().max()))
    return errors, state


def test_anderson_beats_picard_on_a_linear_contraction():
    matrix, offsets = linear_problem(size=40, batch=3, radius=0.95, seed=0)
    picard, _ = iterate(None, matrix, offsets, 60)
    anderson, state = iterate(Anderson(memory=20), matrix, offsets, 60)
    assert picard[-1] > 1e-2  # 0.95^60 ≈ 0.05: Picard is far from done
    assert anderson[-1] < 1e-10
    assert sum(state.accelerated_steps.tolist()) > 0


def test_anderson_with_memory_one_on_a_scalar_linear_map_is_exact_in_two_steps():
    # For x = a x + b in one dimension, the secant step through two iterates lands on the root.
    offsets = torch.tensor([[[0.3], [-1.2]]], dtype=torch.float64)
    matrix = torch.tensor([[0.9]], dtype=torch.float64)
    errors, _ = iterate(Anderson(memory=1), matrix, offsets, 3)
    assert errors[1] < 1e-12


def test_safeguard_is_per_sample():
    # Sample 1 starts at its fixed point (b = 0): its residual differences vanish, the normal
    # matrix is singular, so only it takes plain steps; sample 0 is accelerated.
    matrix, offsets = linear_problem(size=10, batch=2, radius=0.8, seed=1)
    offsets[:, 1] = 0
    _, state = iterate(Anderson(memory=3), matrix, offsets, 6)
    assert state.plain_steps.tolist()[1] == 5  # every step after the first
    assert state.accelerated_steps.tolist()[1] == 0
    assert state.accelerated_steps.tolist()[0] >= 4
