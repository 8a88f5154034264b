"""Linear recurrences ``y_t = A_t y_{t−1} + b_t``: a sequential reference and a parallel scan.

Both functions take the same arguments and return the same ``(T, B, S)`` tensor.  ``A`` comes in
three structures, told apart by its shape:

- ``"diagonal"``: ``A (T, B, S)``, ``A_t y = A_t ⊙ y``;
- ``"block2"``: ``A (T, B, S/2, 2, 2)``: 2×2 blocks on the pairs ``(y_j, y_{j + S/2})`` — the
  per-unit ``(h_j, c_j)`` blocks of an LSTM state ``[h, c]``;
- ``"dense"``: ``A (T, B, S, S)``.

The parallel version is a work-efficient scan over the pairs ``(A, b)`` with the associative
composition ``(A_2, b_2) ∘ (A_1, b_1) = (A_2 A_1, A_2 b_1 + b_2)``: odd–even reduction (the
recursive form of Blelloch's up- and down-sweep), ``O(T)`` work in ``⌈log₂ T⌉`` levels of batched
products on strided views, any ``T``.  ``reverse=True`` runs ``y_t = A_t y_{t+1} + b_t`` from the end
(``y_{T+1} = y0``), the form of an adjoint recurrence.  ``chunk`` bounds memory: the sequence is
scanned in chunks of that length, each started from the last state of the one before.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fixedpoint.errors import InputError
from fixedpoint.kernels import use_kernels

Structure = Literal["diagonal", "block2", "dense"]


def structure_of(transitions: Tensor, values: Tensor) -> Structure:
    """The structure of ``A`` from the shapes of ``A`` and ``b (T, B, S)``."""
    if values.dim() != 3:
        raise InputError(f"b must have shape (T, B, S), got {tuple(values.shape)}")
    steps, batch, size = values.shape
    shape = tuple(transitions.shape)
    if shape == (steps, batch, size):
        return "diagonal"
    if shape == (steps, batch, size, size):
        return "dense"
    if size % 2 == 0 and shape == (steps, batch, size // 2, 2, 2):
        return "block2"
    raise InputError(
        f"A has shape {shape}; with b of shape {tuple(values.shape)} expected (T, B, S) diagonal, "
        f"(T, B, S/2, 2, 2) 2×2 blocks or (T, B, S, S) dense"
    )


def apply_transitions(transitions: Tensor, vectors: Tensor, structure: Structure) -> Tensor:
    """``A y`` for matching leading shapes: ``(..., [S | S/2,2,2 | S,S])`` and ``(..., S)``."""
    if structure == "diagonal":
        return transitions * vectors
    if structure == "dense":
        return (transitions @ vectors.unsqueeze(-1)).squeeze(-1)
    # 2×2 blocks written out: batched 2×2 matmuls are many times slower than four products.
    half = vectors.shape[-1] // 2
    first, second = vectors[..., :half], vectors[..., half:]
    a = transitions
    return torch.cat(
        (a[..., 0, 0] * first + a[..., 0, 1] * second, a[..., 1, 0] * first + a[..., 1, 1] * second), dim=-1
    )


def _compose(later: Tensor, earlier: Tensor, structure: Structure, out: Tensor | None = None) -> Tensor:
    """``A_later · A_earlier``, into ``out`` when given."""
    if _recording(later, earlier):  # autograd records no out= operations: compose, then copy
        composed = _compose_plain(later, earlier, structure)
        return composed if out is None else out.copy_(composed)
    if structure == "diagonal":
        return torch.mul(later, earlier, out=out)
    if structure == "dense":
        return torch.matmul(later, earlier, out=out)
    # 2×2 blocks written out entry by entry, each product accumulated in place.
    out = torch.empty_like(later) if out is None else out
    for row in range(2):
        for column in range(2):
            entry = out[..., row, column]
            torch.mul(later[..., row, 0], earlier[..., 0, column], out=entry)
            entry.addcmul_(later[..., row, 1], earlier[..., 1, column])
    return out


def _check(transitions: Tensor, values: Tensor, initial: Tensor) -> Structure:
    structure = structure_of(transitions, values)
    if tuple(initial.shape) != tuple(values.shape[1:]):
        raise InputError(f"y0 must have shape (B, S) = {tuple(values.shape[1:])}, got {tuple(initial.shape)}")
    if not (transitions.dtype == values.dtype == initial.dtype):
        raise InputError("A, b and y0 must share one dtype")
    return structure


def linear_recurrence_sequential(
    transitions: Tensor, values: Tensor, initial: Tensor, *, reverse: bool = False, chunk: int | None = None
) -> Tensor:
    """Reference: ``y_t = A_t y_{t−1} + b_t`` one step after another; ``(T, B, S)``."""
    structure = _check(transitions, values, initial)
    del chunk  # same signature as the parallel version; the loop needs no chunking
    order = range(values.shape[0] - 1, -1, -1) if reverse else range(values.shape[0])
    out = torch.empty_like(values)
    state = initial
    for t in order:
        state = apply_transitions(transitions[t], state, structure) + values[t]
        out[t] = state
    return out


def linear_recurrence(
    transitions: Tensor, values: Tensor, initial: Tensor, *, reverse: bool = False, chunk: int | None = None
) -> Tensor:
    """Parallel scan for ``y_t = A_t y_{t−1} + b_t`` (``y_0 = initial``); ``(T, B, S)``.

    Args:
        transitions: ``A``, diagonal ``(T, B, S)``, 2×2 blocks ``(T, B, S/2, 2, 2)`` or dense
            ``(T, B, S, S)``.
        values: ``b (T, B, S)``.
        initial: ``y_0 (B, S)``.
        reverse: run from ``t = T`` down to 1 with ``y_{T+1} = initial``.
        chunk: scan at most this many positions at a time (memory ``O(chunk)``, not ``O(T)``).

    On CUDA with Triton installed, diagonal and 2×2-block transitions go to the fused kernel
    :func:`fixedpoint.kernels.scan.linear_recurrence` (unless autograd records the call, or
    ``FIXEDPOINT_KERNELS=torch``); elsewhere to :func:`linear_recurrence_torch`, its reference.
    """
    structure = _check(transitions, values, initial)
    if structure != "dense" and use_kernels(values, transitions, initial):
        from fixedpoint.kernels.scan import linear_recurrence as fused  # imports Triton

        return fused(transitions, values, initial, reverse=reverse)
    return linear_recurrence_torch(transitions, values, initial, reverse=reverse, chunk=chunk)


def linear_recurrence_torch(
    transitions: Tensor, values: Tensor, initial: Tensor, *, reverse: bool = False, chunk: int | None = None
) -> Tensor:
    """:func:`linear_recurrence` in torch operations on any device: the CPU path, the reference
    of the fused kernels, and the differentiable form under autograd."""
    structure = _check(transitions, values, initial)
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise InputError(f"chunk must be a positive integer or None, got {chunk!r}")
    if reverse:
        return linear_recurrence_torch(transitions.flip(0), values.flip(0), initial, chunk=chunk).flip(0)
    steps = values.shape[0]
    size = chunk or steps
    pieces = []
    state = initial
    for start in range(0, steps, size):
        piece = _scan(transitions[start : start + size], values[start : start + size], state, structure)
        pieces.append(piece)
        state = piece[-1]
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _scan(transitions: Tensor, values: Tensor, initial: Tensor, structure: Structure) -> Tensor:
    # Fold y_0 into the first value; then y_0 = b_0 and the recurrence needs no initial state.
    first = _affine(transitions[0], initial, values[0], structure)
    if _recording(transitions, values, initial):
        return _odd_even_differentiable(transitions, values, first, structure)
    out = torch.empty_like(values)
    # One workspace for every level's paired transitions and values (their lengths halve: they
    # fit in T positions), instead of two allocations per level.
    workspace = (torch.empty_like(transitions), torch.empty_like(values))
    _odd_even(transitions, values, first, out, structure, workspace)
    return out


def _compose_plain(later: Tensor, earlier: Tensor, structure: Structure) -> Tensor:
    """``A_later · A_earlier`` from out-of-place operations (differentiable)."""
    if structure == "diagonal":
        return later * earlier
    if structure == "dense":
        return later @ earlier
    rows = [
        torch.stack([later[..., r, 0] * earlier[..., 0, c] + later[..., r, 1] * earlier[..., 1, c] for c in range(2)], -1)
        for r in range(2)
    ]
    return torch.stack(rows, dim=-2)


def _recording(*tensors: Tensor) -> bool:
    """Whether autograd records operations on these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _affine(
    transitions: Tensor, vectors: Tensor, values: Tensor, structure: Structure, out: Tensor | None = None
) -> Tensor:
    """``A y + b`` into one new tensor (or into ``out``), without temporaries where the structure allows."""
    if _recording(transitions, vectors, values):
        return apply_transitions(transitions, vectors, structure) + values
    if structure == "diagonal":
        return torch.addcmul(values, transitions, vectors, out=out)
    if structure == "dense":
        result = (transitions @ vectors.unsqueeze(-1)).squeeze(-1).add_(values)
        return result if out is None else out.copy_(result)
    half = vectors.shape[-1] // 2
    out = torch.empty_like(values) if out is None else out
    for row, rows in enumerate((slice(0, half), slice(half, None))):
        part = out[..., rows]
        torch.addcmul(values[..., rows], transitions[..., row, 0], vectors[..., :half], out=part)
        part.addcmul_(transitions[..., row, 1], vectors[..., half:])
    return out


def _odd_even(
    transitions: Tensor, values: Tensor, first: Tensor, out: Tensor, structure: Structure,
    workspace: tuple[Tensor, Tensor],
) -> None:
    """Write ``y_t = A_t y_{t−1} + b_t`` (``y_0 = first``; ``A_0``, ``b_0`` unused) into ``out``.

    Work-efficient (odd–even reduction, the recursive form of Blelloch's up- and down-sweep):
    pairing positions ``(2i, 2i+1)`` gives a recurrence half as long for the odd positions,
    ``y_{2i+1} = (A_{2i+1} A_{2i}) y_{2i−1} + (A_{2i+1} b_{2i} + b_{2i+1})``, solved recursively
    into the odd slots of ``out`` (a strided view, no copy); the even positions then follow in
    one batched step, ``y_{2i} = A_{2i} y_{2i−1} + b_{2i}``.  ``O(T)`` work in ``⌈log₂ T⌉``
    levels whose new tensors halve in size: the pairs' storage totals about one ``A`` and one ``b``.
    ``first`` may already be ``out[0]`` (each level writes the next level's first value there).
    """
    steps = values.shape[0]
    if first.data_ptr() != out[0].data_ptr():
        out[0] = first
    if steps == 1:
        return
    pairs = steps // 2
    later = transitions[1 : 2 * pairs : 2]
    paired_transitions, paired_values = (w[:pairs] for w in workspace)
    rest = tuple(w[pairs:] for w in workspace)
    _affine(later, values[0 : 2 * pairs : 2], values[1 : 2 * pairs : 2], structure, out=paired_values)
    odd = out[1 : 2 * pairs : 2]
    paired_first = _affine(transitions[1], first, values[1], structure, out=odd[0])
    # Position 0 of the shorter recurrence is never read (its predecessor is folded into
    # paired_first), so its transition is left unset.
    if pairs > 1:
        _compose(later[1:], transitions[2 : 2 * pairs : 2], structure, out=paired_transitions[1:])
    _odd_even(paired_transitions, paired_values, paired_first, odd, structure, rest)
    count = (steps - 1) // 2  # even positions 2, 4, …, each after odd position 2i − 1
    if count:
        _affine(transitions[2::2], odd[:count], values[2::2], structure, out=out[2::2])


def _odd_even_differentiable(transitions: Tensor, values: Tensor, first: Tensor, structure: Structure) -> Tensor:
    """:func:`_odd_even` from out-of-place operations, for autograd (which forbids writing into
    views it has saved): the halves are interleaved by a stack instead of strided writes."""
    steps = values.shape[0]
    if steps == 1:
        return first.unsqueeze(0)
    pairs = steps // 2
    later = transitions[1 : 2 * pairs : 2]
    paired_values = _affine(later, values[0 : 2 * pairs : 2], values[1 : 2 * pairs : 2], structure)
    paired_first = _affine(transitions[1], first, values[1], structure)
    paired_transitions = torch.cat((later[:1], _compose(later[1:], transitions[2 : 2 * pairs : 2], structure)))
    odd = _odd_even_differentiable(paired_transitions, paired_values, paired_first, structure)
    count = (steps - 1) // 2
    even = torch.cat((first.unsqueeze(0), _affine(transitions[2::2], odd[:count], values[2::2], structure)))
    interleaved = torch.stack((even[:pairs], odd), dim=1).flatten(0, 1)
    return torch.cat((interleaved, even[pairs:])) if steps % 2 else interleaved


# -- the regularised (Levenberg–Marquardt) step: a Kalman smoother and block cyclic reduction -----
def _unit_blocks(transitions: Tensor, values: Tensor, structure: Structure) -> tuple[Tensor, Tensor]:
    """``A`` as ``(n, B, G, k, k)`` blocks and ``b`` as ``(n, B, G, k)``: ``G = S, k = 1``
    (diagonal), ``G = S/2, k = 2`` (block2, pairs ``(y_j, y_{j+S/2})``), ``G = 1, k = S`` (dense)."""
    steps, batch, size = values.shape
    if structure == "diagonal":
        return transitions[..., None, None], values[..., None]
    if structure == "block2":
        return transitions, values.view(steps, batch, 2, size // 2).transpose(2, 3)
    return transitions.unsqueeze(2), values.unsqueeze(2)


def _from_unit_blocks(blocks: Tensor, structure: Structure) -> Tensor:
    """Inverse of :func:`_unit_blocks` for vectors: ``(n, B, G, k) → (n, B, S)``."""
    if structure == "diagonal":
        return blocks[..., 0]
    if structure == "block2":
        return blocks.transpose(2, 3).reshape(blocks.shape[0], blocks.shape[1], -1)
    return blocks[:, :, 0]


def _regularized_structure(transitions: Tensor, values: Tensor, regularization: Tensor) -> Structure:
    """The structure of ``A``, after checking that ``regularization`` is ``λ (B,)``."""
    structure = structure_of(transitions, values)
    if tuple(regularization.shape) != (values.shape[1],):
        raise InputError(f"regularization must have shape (B,) = ({values.shape[1]},), got {tuple(regularization.shape)}")
    return structure


def regularized_recurrence_sequential(transitions: Tensor, values: Tensor, regularization: Tensor) -> Tensor:
    """Reference of :func:`regularized_recurrence`, with its signature: ELK's Kalman filter and
    Rauch–Tung–Striebel smoother (Gonzalez et al., 2024), sequential over ``T``.

    The step is the posterior mean of the linear-Gaussian model ``y_t = A_t y_{t−1} + b_t + w_t``,
    ``w_t ~ N(0, I)``, observed as ``0 = y_t + v_t``, ``v_t ~ N(0, I/λ)``.  The covariances share
    ``A``'s structure (per unit for diagonal and 2×2 blocks, dense otherwise).
    """
    structure = _regularized_structure(transitions, values, regularization)
    blocks, forcing = _unit_blocks(transitions, values, structure)
    steps = values.shape[0]
    size = blocks.shape[-1]
    identity = torch.eye(size, dtype=values.dtype, device=values.device)
    # Observation noise 1/λ; λ = 0 (no observation) is the limit K = 0, kept finite by the floor.
    noise = (1 / regularization.clamp(min=torch.finfo(values.dtype).tiny)).clamp(max=torch.finfo(values.dtype).max / 4)
    noise = noise.view(-1, 1, 1, 1) * identity
    mean = forcing.new_zeros(forcing.shape[1:])
    covariance = blocks.new_zeros(blocks.shape[1:])
    means, predicted_means, covariances, predicted_covariances = [], [], [], []
    for t in range(steps):
        a = blocks[t]
        predicted_mean = (a @ mean.unsqueeze(-1)).squeeze(-1) + forcing[t]
        predicted_covariance = a @ covariance @ a.mT + identity
        gain = torch.linalg.solve(predicted_covariance + noise, predicted_covariance).mT  # P (P + R)⁻¹, P symmetric
        mean = predicted_mean - (gain @ predicted_mean.unsqueeze(-1)).squeeze(-1)
        covariance = predicted_covariance - gain @ predicted_covariance
        covariance = 0.5 * (covariance + covariance.mT)  # keep it symmetric against rounding
        means.append(mean)
        predicted_means.append(predicted_mean)
        covariances.append(covariance)
        predicted_covariances.append(predicted_covariance)
    smoothed = [means[-1]]
    for t in range(steps - 2, -1, -1):
        # C_t = P_t A_{t+1}ᵀ P_pred_{t+1}⁻¹, computed as a solve with the symmetric P_pred.
        gain = torch.linalg.solve(predicted_covariances[t + 1], blocks[t + 1] @ covariances[t]).mT
        correction = (gain @ (smoothed[-1] - predicted_means[t + 1]).unsqueeze(-1)).squeeze(-1)
        smoothed.append(means[t] + correction)
    return _from_unit_blocks(torch.stack(smoothed[::-1]), structure)


def regularized_recurrence(transitions: Tensor, values: Tensor, regularization: Tensor) -> Tensor:
    """``argmin_y Σ_t ‖y_t − A_t y_{t−1} − b_t‖² + λ_b Σ_t ‖y_t‖²`` with ``y_0 = 0``: ``(T, B, S)``.

    With ``λ = 0`` this is the recurrence ``y_t = A_t y_{t−1} + b_t`` (:func:`linear_recurrence`);
    with ``λ > 0`` it is the Levenberg–Marquardt step of the Newton family, which ELK computes by
    a Kalman smoother (:func:`regularized_recurrence_sequential`, the reference).  ``A`` has any
    structure of this module; ``regularization`` is ``λ (B,)``, one per sample, ``≥ 0``.

    Parallel over time: the minimiser solves the normal equations, a block-tridiagonal system that
    is symmetric positive definite for ``λ > 0`` (blocks per unit for diagonal and 2×2 ``A``,
    ``S × S`` for dense), and block cyclic reduction solves it in ``⌈log₂ T⌉`` levels of batched
    ``k × k`` solves.  Cyclic reduction is block Cholesky in odd–even order, so it is as stable
    as Cholesky on an SPD matrix.  Samples with ``λ = 0`` take the recurrence itself, whose
    accuracy the normal equations (conditioning squared) would lose.
    """
    structure = _regularized_structure(transitions, values, regularization)
    blocks, forcing = _unit_blocks(transitions, values, structure)  # (n, B, G, k, k), (n, B, G, k)
    size = blocks.shape[-1]
    identity = torch.eye(size, dtype=values.dtype, device=values.device)
    later = blocks[1:]  # A_{t+1} for t = 0 … n−2: the coupling of y_t into the next residual
    gram = later.mT @ later
    diagonal = (1 + regularization).view(1, -1, 1, 1, 1) * identity
    diagonal = diagonal.expand_as(blocks).clone()
    diagonal[:-1] += gram
    lower = -blocks.clone()  # row t's coupling to y_{t−1}; y_{−1} = 0, so none in row 0
    lower[0] = 0
    right = forcing.clone()
    right[:-1] -= (later.mT @ forcing[1:].unsqueeze(-1)).squeeze(-1)
    solved = _from_unit_blocks(_cyclic_reduction(diagonal, lower, right), structure)
    exact = regularization == 0
    if bool(exact.any()):
        recurrence = linear_recurrence(transitions, values, torch.zeros_like(values[0]))
        solved = torch.where(exact[None, :, None], recurrence, solved)
    return solved


def _cyclic_reduction(diagonal: Tensor, lower: Tensor, right: Tensor) -> Tensor:
    """Solve the symmetric block-tridiagonal system with diagonal blocks ``D_t``, sub-diagonal
    blocks ``L_t`` (row ``t``, column ``t − 1``; ``L_0`` unused) and super-diagonal ``L_{t+1}ᵀ``:
    ``(n, …, k, k)``, ``(n, …, k, k)``, right-hand side ``(n, …, k)`` → ``(n, …, k)``.

    Each level eliminates the odd positions: ``y_o = D_o⁻¹ (c_o − L_o y_{o−1} − L_{o+1}ᵀ y_{o+1})``
    substituted into the even rows leaves a system of the same form on the even positions, half
    as long; the odd ones follow from it."""
    steps = diagonal.shape[0]
    if steps == 1:
        return _solve_blocks(diagonal[0], right[0].unsqueeze(-1)).squeeze(-1).unsqueeze(0)
    upper = torch.cat((lower[1:].mT, torch.zeros_like(lower[:1])))  # row t's coupling to y_{t+1}
    odd = slice(1, steps, 2)
    # D_o⁻¹ [L_o, U_o, c_o] in one batched solve.
    k = diagonal.shape[-1]
    joint = _solve_blocks(diagonal[odd], torch.cat((lower[odd], upper[odd], right[odd].unsqueeze(-1)), dim=-1))
    to_lower, to_upper, to_right = joint[..., :k], joint[..., k : 2 * k], joint[..., 2 * k]
    even_lower, even_upper = lower[0::2], upper[0::2]
    evens, odds = even_lower.shape[0], to_lower.shape[0]
    # Even row j = 2m reads odd position m − 1 on its left (m ≥ 1) and odd position m on its right (m < odds).
    left = slice(1, evens)
    right_of = slice(0, odds)
    reduced_diagonal = diagonal[0::2].clone()
    reduced_diagonal[left] -= _product(even_lower[left], to_upper[: evens - 1])
    reduced_diagonal[right_of] -= _product(even_upper[right_of], to_lower)
    reduced_lower = torch.zeros_like(even_lower)
    reduced_lower[left] = -_product(even_lower[left], to_lower[: evens - 1])
    reduced_right = right[0::2].clone()
    reduced_right[left] -= _product(even_lower[left], to_right[: evens - 1].unsqueeze(-1)).squeeze(-1)
    reduced_right[right_of] -= _product(even_upper[right_of], to_right.unsqueeze(-1)).squeeze(-1)
    even_solution = _cyclic_reduction(reduced_diagonal, reduced_lower, reduced_right)
    # Odd position m (row 2m + 1) reads even m on its left and even m + 1 on its right (if any).
    odd_solution = to_right - _product(to_lower, even_solution[:odds].unsqueeze(-1)).squeeze(-1)
    beyond = min(odds, evens - 1)
    odd_solution[:beyond] -= _product(to_upper[:beyond], even_solution[1 : beyond + 1].unsqueeze(-1)).squeeze(-1)
    out = torch.empty_like(right)
    out[0::2], out[1::2] = even_solution, odd_solution
    return out


def _product(left: Tensor, right: Tensor) -> Tensor:
    """``left @ right`` for batches of ``k × k`` blocks ``left`` and ``k × m`` ``right``; for
    ``k = 1, 2`` in element-wise operations over the whole batch (a batched product of tiny
    matrices costs far more than its arithmetic)."""
    size = left.shape[-1]
    if size == 1:
        return left * right
    if size == 2:
        top, bottom = right[..., 0:1, :], right[..., 1:2, :]
        return left[..., :, 0:1] * top + left[..., :, 1:2] * bottom
    return left @ right


def _solve_blocks(blocks: Tensor, right: Tensor) -> Tensor:
    """``blocks⁻¹ right`` for SPD ``k × k`` blocks: a division for ``k = 1``, the adjugate for
    ``k = 2`` (the per-unit cases, where a batched factorisation per block costs far more than the
    arithmetic), a batched solve otherwise."""
    size = blocks.shape[-1]
    if size == 1:
        return right / blocks
    if size == 2:
        a, b, c, d = blocks[..., 0, 0], blocks[..., 0, 1], blocks[..., 1, 0], blocks[..., 1, 1]
        determinant = (a * d - b * c).unsqueeze(-1)
        top, bottom = right[..., 0, :], right[..., 1, :]
        first = d.unsqueeze(-1) * top - b.unsqueeze(-1) * bottom
        second = a.unsqueeze(-1) * bottom - c.unsqueeze(-1) * top
        return torch.stack((first, second), dim=-2) / determinant.unsqueeze(-1)
    return torch.linalg.solve(blocks, right)

