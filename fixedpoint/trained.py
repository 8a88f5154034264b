"""Trained recurrent networks that PyPI packages ship, read from the installed package at run time.

Nothing is copied into this repository: each loader finds its weight file inside the installed
distribution (:mod:`importlib.metadata`, without importing the package) and parses it here.

- ``silero-vad`` (MIT licence): a voice activity detector whose decoder is a 128-unit LSTM cell,
  run once per 512-sample chunk of 16 kHz audio (32 ms).  The package's default model is the
  TorchScript file ``silero_vad/data/silero_vad.jit``; its 16 kHz weights are read from it
  (the ``.safetensors`` file beside it holds different weights, and is not used).
  :class:`SileroVAD` holds them: the encoder
  (a learned STFT as a strided convolution, its magnitude, four convolutions) turns audio into
  the LSTM's inputs ``(T, B, 128)``; :meth:`SileroVAD.network` is the LSTM as a
  :class:`~fixedpoint.network.Network` (``torch.nn.LSTM``'s gate order, which the package's
  ``LSTMCell`` shares); :meth:`SileroVAD.speech_probability` is its head.  ``analysis/
  trained_networks.py`` checks the whole against the package's own TorchScript model.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as functional
from torch import Tensor

from fixedpoint.errors import InputError
from fixedpoint.network import Network

class MissingPackage(InputError):
    """A trained network's package is not installed (an :class:`InputError` that says how to install it)."""


def package_file(distribution: str, relative: str, install: str) -> Path:
    """``relative`` inside the installed ``distribution``, or :class:`MissingPackage` saying ``install``."""
    try:
        found = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackage(f"{distribution} is not installed: {install}") from None
    path = Path(found.locate_file(relative))
    if not path.is_file():
        raise MissingPackage(f"{distribution} {found.version} has no {relative}; {install}")
    return path


#: Sample rate, samples per LSTM step, and the context each chunk sees from the one before.
SILERO_RATE, SILERO_CHUNK, SILERO_CONTEXT = 16000, 512, 64
_SILERO_FILE = "silero_vad/data/silero_vad.jit"
#: Our name → the name in the TorchScript model's state_dict (its 16 kHz branch, ``_model``).
_SILERO_NAMES = {
    "stft_conv.weight": "_model.stft.forward_basis_buffer",
    **{f"conv{i + 1}.{part}": f"_model.encoder.{i}.reparam_conv.{part}" for i in range(4) for part in ("weight", "bias")},
    **{f"lstm_cell.{part}": f"_model.decoder.rnn.{part}" for part in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")},
    "final_conv.weight": "_model.decoder.decoder.2.weight",
    "final_conv.bias": "_model.decoder.decoder.2.bias",
}
_SILERO_SHAPES = {
    "stft_conv.weight": (258, 1, 256),
    "conv1.weight": (128, 129, 3), "conv1.bias": (128,),
    "conv2.weight": (64, 128, 3), "conv2.bias": (64,),
    "conv3.weight": (64, 64, 3), "conv3.bias": (64,),
    "conv4.weight": (128, 64, 3), "conv4.bias": (128,),
    "lstm_cell.weight_ih": (512, 128), "lstm_cell.weight_hh": (512, 128),
    "lstm_cell.bias_ih": (512,), "lstm_cell.bias_hh": (512,),
    "final_conv.weight": (1, 128, 1), "final_conv.bias": (1,),
}


@dataclass(frozen=True)
class SileroVAD:
    """silero-vad's 16 kHz model: ``weights`` (float32) by the names of :data:`_SILERO_SHAPES`."""

    weights: dict[str, Tensor]

    def __post_init__(self) -> None:
        for name, shape in _SILERO_SHAPES.items():
            if name not in self.weights:
                raise InputError(f"no tensor {name!r}: not silero-vad's 16 kHz model")
            if tuple(self.weights[name].shape) != shape:
                raise InputError(f"{name} has shape {tuple(self.weights[name].shape)}, expected {shape}")

    @classmethod
    def from_package(cls) -> "SileroVAD":
        """Read the weights of the installed ``silero-vad`` package's default model."""
        path = package_file("silero-vad", _SILERO_FILE, "pip install --no-deps silero-vad (its model file is all that is read)")
        return cls.from_torchscript(path)

    @classmethod
    def from_torchscript(cls, path: str | Path) -> "SileroVAD":
        """The weights of a TorchScript model with silero-vad's state_dict names (:data:`_SILERO_NAMES`)."""
        try:
            with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; the package ships it
                warnings.simplefilter("ignore", DeprecationWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except (RuntimeError, ValueError) as error:
            raise InputError(f"{path} is not a TorchScript model: {str(error).splitlines()[0]}") from None
        missing = [theirs for theirs in _SILERO_NAMES.values() if theirs not in state]
        if missing:
            raise InputError(f"{path} has no {missing[0]!r}: not silero-vad's model")
        return cls({ours: state[theirs].detach().clone().float() for ours, theirs in _SILERO_NAMES.items()})

    def network(self, dtype: torch.dtype = torch.float32) -> Network:
        """The LSTM decoder, one layer, ``I = H = 128``."""
        state = {f"{key}_l0": self.weights[f"lstm_cell.{key}"] for key in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        return Network.from_state_dict(state, kind="lstm", dtype=dtype)

    def features(self, audio: Tensor) -> Tensor:
        """The LSTM's inputs ``(T, B, 128)`` float32 from 16 kHz audio ``(B, N)``, ``T = ⌈N/512⌉``.

        Each 512-sample chunk is read with the 64 samples before it (zeros before the start), as
        the package's streaming model reads it; the audio is zero-padded to whole chunks.  The
        encoder has no state, so all chunks go through it at once.
        """
        if not isinstance(audio, Tensor) or audio.dim() != 2 or audio.shape[1] == 0:
            raise InputError(f"audio must be a (B, N) tensor with N ≥ 1, got {getattr(audio, 'shape', type(audio))}")
        batch, samples = audio.shape
        steps = -(-samples // SILERO_CHUNK)
        padded = functional.pad(audio.float(), (SILERO_CONTEXT, steps * SILERO_CHUNK - samples))
        windows = padded.unfold(1, SILERO_CHUNK + SILERO_CONTEXT, SILERO_CHUNK)  # (B, T, 576)
        x = windows.reshape(batch * steps, 1, -1)
        x = functional.pad(x, (0, 64), mode="reflect")
        x = functional.conv1d(x, self.weights["stft_conv.weight"], stride=128)
        cutoff = 129
        x = torch.sqrt(x[:, :cutoff] ** 2 + x[:, cutoff:] ** 2)
        for name, stride in (("conv1", 1), ("conv2", 2), ("conv3", 2), ("conv4", 1)):
            x = torch.relu(functional.conv1d(x, self.weights[f"{name}.weight"], self.weights[f"{name}.bias"],
                                             stride=stride, padding=1))
        return x.squeeze(-1).reshape(batch, steps, -1).transpose(0, 1).contiguous()

    def speech_probability(self, hidden: Tensor) -> Tensor:
        """The head: ``σ(w · relu(h_t) + b)`` per step, ``(T, B, 128) → (T, B)``."""
        weight = self.weights["final_conv.weight"][:, :, 0].to(hidden.dtype)
        bias = self.weights["final_conv.bias"].to(hidden.dtype)
        return torch.sigmoid(torch.relu(hidden) @ weight.T + bias).squeeze(-1)
