"""Hardware-independent cost proxies, counted on any device with a torch dispatch mode.

A GPU's time for this toolkit's iterations is set by what a CPU run can count exactly: how many
aten operations (≈ kernel launches) an iteration issues, how often it synchronises with the host
(``bool(tensor)`` and ``.item()`` read a device value back through ``aten::_local_scalar_dense``;
``nonzero`` and boolean indexing must wait for an output size), and how many bytes its new tensors
take (a proxy for memory traffic).  :class:`OperationCounter` counts them; ``make bench``
reports them per solver.  Triton kernels (the CUDA path, or Triton's interpreter under
``FIXEDPOINT_KERNELS=triton``) are counted as one launch each, by name, and the aten operations
the interpreter runs inside a launch are not counted.  Blind spot: ``.tolist()`` and ``.numpy()`` of a CPU tensor dispatch
nothing, so a CPU count misses them (on CUDA they copy to the host and are counted).
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: Operations after which the host must wait for the device: a value or an output size read back.
HOST_SYNC_OPERATIONS = frozenset({"_local_scalar_dense", "equal", "nonzero", "masked_select", "unique"})


class OperationCounter(TorchDispatchMode):
    """Count aten operations, host synchronisations and newly allocated bytes inside a ``with``.

    Attributes after the block:
        operations: ``Counter`` of aten operation names (views and ``detach`` excluded: no kernel).
        host_syncs: operations that read a device value or size back to the host, plus copies
            from another device to the CPU.
        allocated_bytes: bytes of every new output storage (views and ``out=`` writes excluded).
        kernel_launches: ``Counter`` of Triton kernel launches by kernel name.
    """

    def __init__(self) -> None:
        super().__init__()
        self.operations: Counter[str] = Counter()
        self.kernel_launches: Counter[str] = Counter()
        self.host_syncs = 0
        self.allocated_bytes = 0
        self._in_launch = 0
        self._patched: list[tuple[type, Any]] = []

    def __enter__(self) -> "OperationCounter":
        self._patch_triton()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for cls, run in self._patched:
            cls.run = run
        self._patched = []

    def _patch_triton(self) -> None:
        """Count launches of every Triton kernel class that can run here; Triton is imported
        only where the kernels may serve (never on the plain CPU path)."""
        from fixedpoint.kernels import kernel_choice, triton_available

        if "triton" not in sys.modules and not (
            triton_available() and (kernel_choice() == "triton" or torch.cuda.is_available())
        ):
            return
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        counter = self
        for cls in (JITFunction, InterpretedFunction):
            original = cls.run

            def run(kernel: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
                if not kwargs.get("warmup"):
                    counter.kernel_launches[getattr(kernel, "__name__", "kernel")] += 1
                counter._in_launch += 1
                try:
                    return _original(kernel, *args, **kwargs)
                finally:
                    counter._in_launch -= 1

            self._patched.append((cls, original))
            cls.run = run

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if self._in_launch or name == "detach" or _aliases_input(func):
            return result
        self.operations[name] += 1
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
        if name in HOST_SYNC_OPERATIONS or any(
            t.device.type != "cpu" for t in inputs
        ) and any(t.device.type == "cpu" for t in outputs):
            self.host_syncs += 1
        seen = {_storage_key(t) for t in inputs}
        for output in outputs:
            key = _storage_key(output)
            if key not in seen:
                seen.add(key)
                self.allocated_bytes += output.untyped_storage().nbytes()
        return result

    @property
    def total_operations(self) -> int:
        """Aten operations (Triton launches not included)."""
        return sum(self.operations.values())

    @property
    def launches(self) -> int:
        """Aten operations plus Triton kernel launches: what a GPU launches."""
        return self.total_operations + sum(self.kernel_launches.values())


def _aliases_input(func: Any) -> bool:
    """A view or metadata operation: its output shares an input's storage without writing it."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr() or id(tensor)
