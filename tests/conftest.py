"""pytest's hooks for the fixedpoint test suite: Triton's interpreter without a GPU, the
hypothesis profiles, the ``--permuted-reference`` option and the fixtures.  The helpers the
tests import are in ``helpers.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

# Without a CUDA device the Triton kernels run in Triton's interpreter (on CPU tensors); the
# variable must be set before Triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings

from helpers import generator, use_permuted_reference

# Hypothesis profiles: "default" keeps the suite fast; HYPOTHESIS_PROFILE=thorough searches longer.
settings.register_profile("default", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--permuted-reference", action="store_true",
        help="compute every reference (torch.nn and the sequential loop) on a copy of the network with "
        "its hidden units permuted: the same mathematics summed in another order, as another CPU's GEMM "
        "rounds it; a test that then fails asserted one machine's rounding",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--permuted-reference", default=False):
        use_permuted_reference()


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh, seeded generator for tests that draw their own tensors."""
    return generator(1234)

