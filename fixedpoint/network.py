"""A stack of cells as ``torch.nn.RNN/GRU/LSTM`` holds them, and its conversions.

A :class:`Network` is ``num_layers × num_directions`` cells.  It is built from a ``torch.nn``
module, from a file written by ``torch.save`` (a whole module or its ``state_dict``), or at
random from a seed; :meth:`Network.to_torch` gives back the equivalent ``torch.nn`` module,
which is the reference every solve is checked against.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from fixedpoint.cells import CELL_TYPES, SUPPORTED_DTYPES, Cell, ElmanCell
from fixedpoint.errors import InputError
from fixedpoint.files import load_torch_file
from fixedpoint.stack import parameter_suffix

TORCH_MODULES: dict[str, type[nn.RNNBase]] = {"elman": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
_KIND_OF_MODULE = {nn.RNN: "elman", nn.GRU: "gru", nn.LSTM: "lstm"}
_KIND_OF_GATES = {1: "elman", 3: "gru", 4: "lstm"}


@dataclass(frozen=True, eq=False)
class Network:
    """``cells[layer][direction]``; direction 1 (if present) runs on the time-reversed input.

    Attributes:
        cells: one tuple per layer, holding one cell (or two when bidirectional).
        batch_first: whether inputs and outputs are ``(B, T, ·)`` as in ``torch.nn``.
    """

    cells: tuple[tuple[Cell, ...], ...]
    batch_first: bool = False
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.cells or any(len(layer) not in (1, 2) for layer in self.cells):
            raise InputError("a network needs ≥ 1 layer of 1 or 2 directions")
        directions = {len(layer) for layer in self.cells}
        if len(directions) != 1:
            raise InputError("every layer must have the same number of directions")
        first = self.cells[0][0]
        object.__setattr__(self, "kind", first.kind)
        for layer_index, layer in enumerate(self.cells):
            expected_input = first.input_size if layer_index == 0 else self.num_directions * self.output_size
            for cell in layer:
                if type(cell) is not type(first) or getattr(cell, "nonlinearity", None) != getattr(
                    first, "nonlinearity", None
                ):
                    raise InputError("all cells of a network must be of one type")
                if cell.hidden_size != first.hidden_size or cell.output_size != first.output_size:
                    raise InputError("all cells of a network must have one hidden size (and one proj_size)")
                if cell.input_size != expected_input:
                    raise InputError(
                        f"layer {layer_index} cells take inputs of size {cell.input_size}; "
                        f"expected {expected_input}"
                    )
                if cell.dtype != first.dtype or cell.device != first.device:
                    raise InputError("all cells of a network must share dtype and device")
                if (cell.bias_ih is None) != (first.bias_ih is None):
                    raise InputError("every cell must have biases, or none (torch.nn's bias is per network)")

    # -- sizes -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.cells)

    @property
    def num_directions(self) -> int:
        return len(self.cells[0])

    @property
    def bidirectional(self) -> bool:
        return self.num_directions == 2

    @property
    def input_size(self) -> int:
        return self.cells[0][0].input_size

    @property
    def hidden_size(self) -> int:
        return self.cells[0][0].hidden_size

    @property
    def output_size(self) -> int:
        """The size of each direction's output ``h``: ``H``, or an LSTM's ``proj_size``."""
        return self.cells[0][0].output_size

    @property
    def proj_size(self) -> int:
        """``torch.nn.LSTM``'s ``proj_size`` (0: no projection, and for RNN and GRU)."""
        return getattr(self.cells[0][0], "proj_size", 0)

    @property
    def dtype(self) -> torch.dtype:
        return self.cells[0][0].dtype

    @property
    def device(self) -> torch.device:
        return self.cells[0][0].device

    @property
    def nonlinearity(self) -> str | None:
        return getattr(self.cells[0][0], "nonlinearity", None)

    @property
    def has_bias(self) -> bool:
        return self.cells[0][0].bias_ih is not None

    def describe(self) -> str:
        """A short name such as ``gru`` or ``elman(relu)``."""
        return self.kind if self.nonlinearity is None else f"{self.kind}({self.nonlinearity})"

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Network":
        """Convert every cell to ``dtype`` / ``device``."""
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise InputError(f"dtype must be float32 or float64, got {dtype}")
        return Network(
            tuple(tuple(cell.to(dtype, device) for cell in layer) for layer in self.cells),
            batch_first=self.batch_first,
        )

    # -- torch.nn conversions ----------------------------------------------------------------
    @classmethod
    def from_torch(cls, module: nn.Module) -> "Network":
        """Build from a ``torch.nn.RNN``, ``GRU`` or ``LSTM`` (any layers, directions)."""
        kind = _KIND_OF_MODULE.get(type(module))
        if kind is None:
            raise InputError(
                f"expected torch.nn.RNN, GRU or LSTM, got {type(module).__name__}"
            )
        nonlinearity = getattr(module, "nonlinearity", "tanh")
        network = cls.from_state_dict(module.state_dict(), kind=kind, nonlinearity=nonlinearity)
        return Network(network.cells, batch_first=bool(module.batch_first))

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Tensor],
        *,
        kind: str | None = None,
        nonlinearity: str = "tanh",
        batch_first: bool = False,
        dtype: torch.dtype | None = None,
    ) -> "Network":
        """Build from a ``torch.nn`` RNN/GRU/LSTM ``state_dict`` (keys ``weight_ih_l0`` …).

        ``kind`` is inferred from the gate count when omitted; a given ``kind`` that disagrees
        with the weights is an error.  A ``state_dict`` does not record an Elman network's
        nonlinearity, so it is taken from ``nonlinearity``.  ``dtype`` converts the weights
        (float32/float64) before they are checked, e.g. to solve a float16 checkpoint.
        """
        if not isinstance(state_dict, Mapping) or "weight_hh_l0" not in state_dict:
            raise InputError(
                "not a torch.nn RNN/GRU/LSTM state_dict: there is no 'weight_hh_l0' entry"
            )
        for key, value in state_dict.items():
            if not isinstance(value, Tensor):
                raise InputError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        weight_hh = state_dict["weight_hh_l0"]
        if weight_hh.dim() != 2:
            raise InputError(f"weight_hh_l0 must be a matrix, got shape {tuple(weight_hh.shape)}")
        if "weight_hr_l0" in state_dict:
            # A projection (LSTM's proj_size): weight_hh is (4H, P); the cell checks weight_hr (P, H).
            inferred = "lstm" if weight_hh.shape[0] % 4 == 0 else None
        else:
            hidden = weight_hh.shape[-1]
            gates = weight_hh.shape[0] // hidden if hidden else 0
            inferred = _KIND_OF_GATES.get(gates) if weight_hh.shape[0] == gates * hidden else None
        if inferred is None:
            raise InputError(f"weight_hh_l0 has shape {tuple(weight_hh.shape)}; not an RNN/GRU/LSTM")
        if kind is not None and kind != inferred:
            raise InputError(f"the weights are those of a {inferred} network, not a {kind} network")
        cell_type = CELL_TYPES[inferred]
        known = set()
        layers = []
        layer = 0
        while f"weight_hh_l{layer}" in state_dict:
            directions = []
            for direction in range(2):
                names = [f"{p}{parameter_suffix(layer, direction)}" for p in cell_type.tensor_names]
                if names[1] not in state_dict:
                    continue
                known.update(names)
                tensors = [state_dict.get(name) for name in names]
                if tensors[0] is None:
                    raise InputError(f"state_dict lacks {names[0]}")
                tensors = [None if t is None else t.detach().to(dtype=dtype, copy=True) for t in tensors]
                extra = {"nonlinearity": nonlinearity} if cell_type is ElmanCell else {}
                directions.append(cell_type(*tensors, **extra))
            layers.append(tuple(directions))
            layer += 1
        unknown = sorted(set(state_dict) - known)
        if unknown:
            raise InputError(f"unexpected entries in the state_dict: {', '.join(unknown[:5])}")
        return cls(tuple(layers), batch_first=batch_first)

    def state_dict(self) -> dict[str, Tensor]:
        """The ``torch.nn`` ``state_dict`` of this network."""
        out: dict[str, Tensor] = {}
        for layer_index, layer in enumerate(self.cells):
            for direction, cell in enumerate(layer):
                suffix = parameter_suffix(layer_index, direction)
                for name in cell.tensor_names:
                    value = getattr(cell, name)
                    if value is not None:
                        out[name + suffix] = value
        return out

    def to_torch(self) -> nn.RNNBase:
        """The equivalent ``torch.nn.RNN/GRU/LSTM`` module (same weights, dtype, device)."""
        options = dict(
            input_size=self.input_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            bias=self.has_bias,
            batch_first=self.batch_first,
            bidirectional=self.bidirectional,
            dtype=self.dtype,
            device=self.device,
        )
        if self.kind == "elman":
            options["nonlinearity"] = self.nonlinearity
        if self.proj_size:
            options["proj_size"] = self.proj_size
        module = TORCH_MODULES[self.kind](**options)
        module.load_state_dict(self.state_dict())
        return module

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def random(
        cls,
        kind: str,
        input_size: int,
        hidden_size: int,
        *,
        num_layers: int = 1,
        bidirectional: bool = False,
        bias: bool = True,
        nonlinearity: str = "tanh",
        scale: float = 1.0,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        proj_size: int = 0,
    ) -> "Network":
        """``torch.nn``'s default initialisation, ``U(−1/√H, 1/√H)``, drawn from ``seed``,
        with every recurrent matrix ``W_hh`` multiplied by ``scale``.  ``proj_size = P > 0``
        (LSTM only, ``P < H``): projected outputs, with ``weight_hr (P, H)`` drawn last in each cell."""
        # Long because of its torch.nn-style keyword arguments and their checks, not its logic.
        if kind not in CELL_TYPES:
            raise InputError(f"cell must be one of {sorted(CELL_TYPES)}, got {kind!r}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale < 0:
            raise InputError(f"scale must be a finite number ≥ 0, got {scale!r}")
        check_seed(seed)
        if kind != "elman" and nonlinearity != "tanh":
            raise InputError(f"nonlinearity applies to Elman cells only, not {kind}")
        if not isinstance(proj_size, int) or isinstance(proj_size, bool) or proj_size < 0:
            raise InputError(f"proj_size must be an integer ≥ 0, got {proj_size!r}")
        if proj_size and kind != "lstm":
            raise InputError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if proj_size >= hidden_size:
            raise InputError(f"proj_size has to be smaller than hidden_size, got {proj_size} ≥ {hidden_size}")
        if dtype not in SUPPORTED_DTYPES:
            raise InputError(f"dtype must be float32 or float64, got {dtype}")
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(hidden_size)
        rows = CELL_TYPES[kind].gate_count * hidden_size
        directions = 2 if bidirectional else 1

        def uniform(*shape: int) -> Tensor:
            # Drawn in float64 on the CPU so that a seed gives the same weights everywhere.
            sample = torch.rand(*shape, generator=generator, dtype=torch.float64) * (2 * bound) - bound
            return sample.to(dtype=dtype, device=device)

        layers = []
        output = proj_size or hidden_size
        for layer_index in range(num_layers):
            layer_input = input_size if layer_index == 0 else directions * output
            cells = []
            for _ in range(directions):
                weight_ih = uniform(rows, layer_input)
                weight_hh = uniform(rows, output) * scale
                biases = (uniform(rows), uniform(rows)) if bias else (None, None)
                extra = {"nonlinearity": nonlinearity} if kind == "elman" else {}
                if proj_size:
                    extra = {"weight_hr": uniform(proj_size, hidden_size)}
                cells.append(CELL_TYPES[kind](weight_ih, weight_hh, *biases, **extra))
            layers.append(tuple(cells))
        return cls(tuple(layers))


def check_seed(seed: object) -> None:
    """Raise :class:`InputError` unless ``seed`` fits ``torch.Generator.manual_seed``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63 - 1:
        raise InputError(f"seed must be an integer in [0, 2**63 − 1), got {seed!r}")


def load_network(
    path: str | os.PathLike, *, nonlinearity: str | None = None, dtype: torch.dtype | None = None
) -> Network:
    """Load a network from a file written by ``torch.save``: a ``torch.nn.RNN/GRU/LSTM``
    module or its ``state_dict``.

    The file is read with ``weights_only=True`` (no arbitrary code runs); the three module
    classes are the only extra types allowed.  For an Elman ``state_dict`` the nonlinearity is
    not stored: pass it (default ``tanh``).  For a whole module, a ``nonlinearity`` that
    disagrees with the module is an error, and so is one given for a GRU or LSTM.  ``dtype``
    converts the weights.  Loading a whole module needs torch ≥ 2.5 (``safe_globals``); a
    ``state_dict`` loads on any supported torch.
    """
    obj = load_torch_file(path, "weights", "an RNN/GRU/LSTM module or state_dict", (nn.RNN, nn.GRU, nn.LSTM))
    if isinstance(obj, nn.Module):
        if dtype is not None:
            obj = obj.to(dtype)
        network = Network.from_torch(obj)
    elif isinstance(obj, Mapping):
        network = Network.from_state_dict(obj, nonlinearity=nonlinearity or "tanh", dtype=dtype)
    else:
        raise InputError(f"{path} holds a {type(obj).__name__}, not an RNN/GRU/LSTM module or state_dict")
    if nonlinearity is not None and network.nonlinearity != nonlinearity:
        found = "no nonlinearity option" if network.nonlinearity is None else f"nonlinearity {network.nonlinearity!r}"
        raise InputError(f"the {network.kind} network in {path} has {found}, not {nonlinearity!r}")
    return network
