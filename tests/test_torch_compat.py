"""PyTorch's own sample inputs for ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` through ``fixedpoint.nn``.

The samples, and the inputs torch.nn must reject, are read at run time from the installed torch
(``torch.testing._internal.common_modules.module_db``, which imports the ``expecttest`` package);
each runs through the ``torch.nn`` module and the ``fixedpoint.nn`` module with the same
parameters, and the outputs, the gradients of the inputs and of every parameter, and the errors
must agree.  float64, where the two agree to 1e-10.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fixedpoint.nn as fnn

pytest.importorskip("expecttest", reason="torch's module database imports expecttest (the test extra)")
from torch.testing._internal.common_modules import module_db  # noqa: E402

OURS = {nn.RNN: fnn.RNN, nn.GRU: fnn.GRU, nn.LSTM: fnn.LSTM}
INFOS = {info.module_cls: info for info in module_db if info.module_cls in OURS}
BOUND = 1e-10


def _samples(module_type, training):
    info = INFOS[module_type]
    return info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True, training=training)


def _cases():
    for module_type in OURS:
        for training in (True, False):
            for index, _ in enumerate(_samples(module_type, training)):
                yield pytest.param(module_type, training, index, id=f"{module_type.__name__}-{'train' if training else 'eval'}-{index}")


def _tensors(structure):
    if isinstance(structure, torch.Tensor):
        return [structure]
    if isinstance(structure, (tuple, list)):
        return [t for item in structure for t in _tensors(item)]
    return []


@pytest.mark.parametrize("module_type,training,index", list(_cases()))
def test_torch_sample_inputs_give_torch_nn_s_outputs_and_gradients(module_type, training, index):
    sample = _samples(module_type, training)[index]
    constructor = sample.constructor_input
    torch.manual_seed(0)
    reference = module_type(*constructor.args, **constructor.kwargs).to(torch.float64)
    solved = OURS[module_type](*constructor.args, **constructor.kwargs).to(torch.float64)
    solved.load_state_dict(reference.state_dict())
    reference.train(training)
    solved.train(training)
    results = []
    for module in (reference, solved):
        args = copy.deepcopy(sample.forward_input.args)
        kwargs = copy.deepcopy(sample.forward_input.kwargs)
        leaves = [t for t in _tensors((args, kwargs)) if t.requires_grad]
        torch.manual_seed(1)  # the same dropout masks between layers
        outputs = _tensors(module(*args, **kwargs))
        total = sum(o.sum() for o in outputs)
        gradients = torch.autograd.grad(total, [*leaves, *module.parameters()], allow_unused=True)
        results.append((outputs, gradients))
    (outputs, gradients), (solved_outputs, solved_gradients) = results
    assert [o.shape for o in outputs] == [o.shape for o in solved_outputs]
    for expected, got in zip(outputs, solved_outputs):
        if expected.numel():
            assert float((expected - got).detach().abs().max()) <= BOUND
    for expected, got in zip(gradients, solved_gradients):
        assert (expected is None) == (got is None) or (expected is not None and not expected.any())
        if expected is not None and got is not None and expected.numel():
            assert float((expected - got).abs().max()) <= BOUND * max(1.0, float(expected.abs().max()))


def _error_cases():
    for module_type in OURS:
        info = INFOS[module_type]
        errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=False, training=False)
        for index, _ in enumerate(errors):
            yield pytest.param(module_type, index, id=f"{module_type.__name__}-{index}")


@pytest.mark.parametrize("module_type,index", list(_error_cases()))
def test_inputs_torch_nn_rejects_raise_the_same_error(module_type, index):
    info = INFOS[module_type]
    error = info.module_error_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=False, training=False)[index]
    sample = error.module_error_input
    constructor = sample.constructor_input
    where = str(error.error_on)
    for module_class in (module_type, OURS[module_type]):
        with pytest.raises(error.error_type, match=error.error_regex):
            module = module_class(*constructor.args, **constructor.kwargs)
            module(*sample.forward_input.args, **sample.forward_input.kwargs)
    assert "CONSTRUCTION" in where or "FORWARD" in where
