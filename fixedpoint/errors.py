"""Exceptions raised for bad input and failed solves.

User errors are raised as :class:`InputError` (a ``ValueError``) with a message that says what
was wrong and how to fix it; they are never ``assert`` statements.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from fixedpoint.solve import Solution


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class InputError(ValueError):
    """Bad input: wrong shape, dtype, non-finite values, mismatched weights, unknown option."""


class NoConvergence(RuntimeError):
    """A solve did not converge; ``solution`` holds the last iterate and its statistics."""

    def __init__(self, solution: "Solution") -> None:
        self.solution = solution
        super().__init__(solution.result.message)
