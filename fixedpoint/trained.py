"""Trained recurrent networks that PyPI packages ship, read from the installed package at run time.

Nothing is copied into this repository: each loader finds its weight file inside the installed
distribution (:mod:`importlib.metadata`, without importing the package) and parses it here.

- ``silero-vad`` (MIT licence): a voice activity detector.  Its default model, the TorchScript
  file ``silero_vad/data/silero_vad.jit``, holds two separately trained models, for 16 kHz and
  8 kHz audio; the decoder of each is a 128-unit LSTM cell run once per 32 ms chunk (512 or 256
  samples).  Both are read from that file (the ``.safetensors`` file beside it holds different
  weights, and is not used).  :class:`SileroVAD` holds one of them: the encoder (a learned STFT
  as a strided convolution, its magnitude, four convolutions) turns audio into the LSTM's inputs
  ``(T, B, 128)``; :meth:`SileroVAD.network` is the LSTM as a
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


#: The package's model file, which holds a 16 kHz and an 8 kHz model, each with its own LSTM.
_SILERO_FILE = "silero_vad/data/silero_vad.jit"


@dataclass(frozen=True)
class SileroLayout:
    """One of the package's two models: the samples per LSTM step (``chunk``), the samples each
    chunk sees from the one before (``context``), the learned STFT's window (``n_fft``, hop
    ``n_fft/2``, right reflect-padding ``n_fft/4``) and the prefix of its state_dict names."""

    rate: int
    chunk: int
    context: int
    n_fft: int
    prefix: str

    @property
    def bins(self) -> int:
        return self.n_fft // 2 + 1

    def names(self) -> dict[str, str]:
        """Our name → the name in the TorchScript model's state_dict."""
        p = self.prefix
        return {
            "stft_conv.weight": f"{p}.stft.forward_basis_buffer",
            **{f"conv{i + 1}.{part}": f"{p}.encoder.{i}.reparam_conv.{part}" for i in range(4) for part in ("weight", "bias")},
            **{f"lstm_cell.{part}": f"{p}.decoder.rnn.{part}" for part in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")},
            "final_conv.weight": f"{p}.decoder.decoder.2.weight",
            "final_conv.bias": f"{p}.decoder.decoder.2.bias",
        }

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            "stft_conv.weight": (2 * self.bins, 1, self.n_fft),
            "conv1.weight": (128, self.bins, 3), "conv1.bias": (128,),
            "conv2.weight": (64, 128, 3), "conv2.bias": (64,),
            "conv3.weight": (64, 64, 3), "conv3.bias": (64,),
            "conv4.weight": (128, 64, 3), "conv4.bias": (128,),
            "lstm_cell.weight_ih": (512, 128), "lstm_cell.weight_hh": (512, 128),
            "lstm_cell.bias_ih": (512,), "lstm_cell.bias_hh": (512,),
            "final_conv.weight": (1, 128, 1), "final_conv.bias": (1,),
        }


SILERO_LAYOUTS = {
    16000: SileroLayout(16000, chunk=512, context=64, n_fft=256, prefix="_model"),
    8000: SileroLayout(8000, chunk=256, context=32, n_fft=128, prefix="_model_8k"),
}
#: The 16 kHz model's sample rate, samples per LSTM step and context.
SILERO_RATE, SILERO_CHUNK, SILERO_CONTEXT = 16000, 512, 64


@dataclass(frozen=True)
class SileroVAD:
    """One of silero-vad's models (``rate`` 16000 or 8000): ``weights`` (float32) by the names of
    :meth:`SileroLayout.shapes`."""

    weights: dict[str, Tensor]
    rate: int = 16000

    def __post_init__(self) -> None:
        if self.rate not in SILERO_LAYOUTS:
            raise InputError(f"rate must be one of {sorted(SILERO_LAYOUTS)}, got {self.rate!r}")
        for name, shape in self.layout.shapes().items():
            if name not in self.weights:
                raise InputError(f"no tensor {name!r}: not silero-vad's {self.rate} Hz model")
            if tuple(self.weights[name].shape) != shape:
                raise InputError(f"{name} has shape {tuple(self.weights[name].shape)}, expected {shape}")

    @property
    def layout(self) -> SileroLayout:
        return SILERO_LAYOUTS[self.rate]

    @classmethod
    def from_package(cls, rate: int = 16000) -> "SileroVAD":
        """Read the weights of the installed ``silero-vad`` package's default model for ``rate``."""
        path = package_file("silero-vad", _SILERO_FILE, "pip install --no-deps silero-vad (its model file is all that is read)")
        return cls.from_torchscript(path, rate)

    @classmethod
    def from_torchscript(cls, path: str | Path, rate: int = 16000) -> "SileroVAD":
        """The weights of a TorchScript model with silero-vad's state_dict names (:meth:`SileroLayout.names`)."""
        if rate not in SILERO_LAYOUTS:
            raise InputError(f"rate must be one of {sorted(SILERO_LAYOUTS)}, got {rate!r}")
        try:
            with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; the package ships it
                warnings.simplefilter("ignore", DeprecationWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except (RuntimeError, ValueError) as error:
            raise InputError(f"{path} is not a TorchScript model: {str(error).splitlines()[0]}") from None
        names = SILERO_LAYOUTS[rate].names()
        missing = [theirs for theirs in names.values() if theirs not in state]
        if missing:
            raise InputError(f"{path} has no {missing[0]!r}: not silero-vad's model")
        return cls({ours: state[theirs].detach().clone().float() for ours, theirs in names.items()}, rate)

    def network(self, dtype: torch.dtype = torch.float32) -> Network:
        """The LSTM decoder, one layer, ``I = H = 128``."""
        state = {f"{key}_l0": self.weights[f"lstm_cell.{key}"] for key in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        return Network.from_state_dict(state, kind="lstm", dtype=dtype)

    def features(self, audio: Tensor) -> Tensor:
        """The LSTM's inputs ``(T, B, 128)`` float32 from audio ``(B, N)`` at the model's rate,
        ``T = ⌈N/chunk⌉`` (chunks of 512 samples at 16 kHz, 256 at 8 kHz).

        Each chunk is read with the ``context`` samples before it (zeros before the start), as
        the package's streaming model reads it; the audio is zero-padded to whole chunks.  The
        encoder has no state, so all chunks go through it at once.
        """
        if not isinstance(audio, Tensor) or audio.dim() != 2 or audio.shape[1] == 0:
            raise InputError(f"audio must be a (B, N) tensor with N ≥ 1, got {getattr(audio, 'shape', type(audio))}")
        layout = self.layout
        batch, samples = audio.shape
        steps = -(-samples // layout.chunk)
        padded = functional.pad(audio.float(), (layout.context, steps * layout.chunk - samples))
        windows = padded.unfold(1, layout.chunk + layout.context, layout.chunk)  # (B, T, chunk + context)
        x = windows.reshape(batch * steps, 1, -1)
        x = functional.pad(x, (0, layout.n_fft // 4), mode="reflect")
        x = functional.conv1d(x, self.weights["stft_conv.weight"], stride=layout.n_fft // 2)
        x = torch.sqrt(x[:, : layout.bins] ** 2 + x[:, layout.bins :] ** 2)
        for name, stride in (("conv1", 1), ("conv2", 2), ("conv3", 2), ("conv4", 1)):
            x = torch.relu(functional.conv1d(x, self.weights[f"{name}.weight"], self.weights[f"{name}.bias"],
                                             stride=stride, padding=1))
        return x.squeeze(-1).reshape(batch, steps, -1).transpose(0, 1).contiguous()

    def speech_probability(self, hidden: Tensor) -> Tensor:
        """The head: ``σ(w · relu(h_t) + b)`` per step, ``(T, B, 128) → (T, B)``."""
        weight = self.weights["final_conv.weight"][:, :, 0].to(hidden.dtype)
        bias = self.weights["final_conv.bias"].to(hidden.dtype)
        return torch.sigmoid(torch.relu(hidden) @ weight.T + bias).squeeze(-1)
