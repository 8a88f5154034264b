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
- ``g2p-en`` (Apache-2.0 licence): English grapheme-to-phoneme conversion.  Its file
  ``g2p_en/checkpoint20.npz`` holds a 256-unit GRU encoder over character embeddings (in
  ``torch.nn.GRU``'s layout and gate order ``r, z, n``) and a GRU decoder.  :class:`G2pEnglish`
  holds the encoder: :meth:`G2pEnglish.network` is the GRU, :meth:`G2pEnglish.features` embeds
  words as the package does (each word's letters, then ``</s>``), back to back; the package's
  own word list (``g2p_en/homographs.en``) supplies real words.  ``analysis/trained_networks.py``
  checks the encoder against the package's own NumPy GRU.
- ``g2pM`` (Apache-2.0 licence): Mandarin polyphone disambiguation.  Its file ``g2pM/np_ckpt.pkl``
  holds a bidirectional LSTM (``I = 64``, ``H = 32``, ``torch.nn.LSTM``'s names and gate order)
  over character embeddings.  :class:`G2pMandarin` holds it; real inputs are the Chinese words of
  the package's own dictionary (``g2pM/digest_cedict.pkl``), their characters back to back.  The
  pickle files are read with an unpickler that admits NumPy arrays, dicts, lists and strings only.
"""

from __future__ import annotations

import importlib.metadata
import pickle
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


def check_arrays(weights: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """:class:`InputError` unless ``weights`` holds every name of ``shapes`` with that shape."""
    for name, shape in shapes.items():
        if name not in weights:
            raise InputError(f"no array {name!r}: not {source}")
        if tuple(weights[name].shape) != shape:
            raise InputError(f"{name} has shape {tuple(weights[name].shape)}, expected {shape}")


def embedded(table: Tensor, samples: list[list[int]], steps: int, unit: str) -> Tensor:
    """``(T, B, E)``: the first ``steps`` rows of ``table`` each sample's ids pick, or
    :class:`InputError` when a sample has fewer than ``steps`` ``unit``."""
    rows = []
    for ids in samples:
        if len(ids) < steps:
            raise InputError(f"{len(ids)} {unit} for a sequence of {steps}: give more words")
        rows.append(table[torch.tensor(ids[:steps])])
    return torch.stack(rows, dim=1).contiguous()


# -- g2p-en ---------------------------------------------------------------------------------------
_G2P_EN_FILE = "g2p_en/checkpoint20.npz"
_G2P_EN_WORDS = "g2p_en/homographs.en"
_G2P_EN_INSTALL = "pip install --no-deps g2p-en (its checkpoint file is all that is read)"
#: The encoder's vocabulary, as the package lists it: padding, unknown, end of word, a–z.
G2P_EN_GRAPHEMES = ("<pad>", "<unk>", "</s>", *"abcdefghijklmnopqrstuvwxyz")
_G2P_EN_SHAPES = {"enc_emb": (29, 256), "enc_w_ih": (768, 256), "enc_w_hh": (768, 256),
                  "enc_b_ih": (768,), "enc_b_hh": (768,)}


@dataclass(frozen=True)
class G2pEnglish:
    """g2p-en's encoder: ``weights`` (float32) by the checkpoint's names, ``enc_emb (29, 256)``
    and the GRU's ``enc_w_ih, enc_w_hh (768, 256)``, ``enc_b_ih, enc_b_hh (768,)``."""

    weights: dict[str, Tensor]

    def __post_init__(self) -> None:
        check_arrays(self.weights, _G2P_EN_SHAPES, "g2p-en's checkpoint")

    @classmethod
    def from_package(cls) -> "G2pEnglish":
        """The encoder of the installed ``g2p-en`` package."""
        return cls.from_npz(package_file("g2p-en", _G2P_EN_FILE, _G2P_EN_INSTALL))

    @classmethod
    def from_npz(cls, path: str | Path) -> "G2pEnglish":
        """The encoder from a NumPy ``.npz`` file with g2p-en's names (no pickled objects are read)."""
        import numpy as np

        try:
            arrays = np.load(str(path), allow_pickle=False)
        except (OSError, ValueError) as error:
            raise InputError(f"{path} is not a NumPy .npz file: {error}") from None
        if not isinstance(arrays, np.lib.npyio.NpzFile):
            raise InputError(f"{path} holds one array, not a NumPy .npz archive of g2p-en's arrays")
        with arrays:
            found = {name: torch.from_numpy(arrays[name].astype(np.float32)) for name in _G2P_EN_SHAPES if name in arrays}
        return cls(found)

    def network(self, dtype: torch.dtype = torch.float32) -> Network:
        """The encoder GRU, one layer, ``I = H = 256``."""
        state = {f"{key}_l0": self.weights[f"enc_{key.replace('weight', 'w').replace('bias', 'b')}"]
                 for key in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        return Network.from_state_dict(state, kind="gru", dtype=dtype)

    @staticmethod
    def token_ids(words: list[str]) -> list[int]:
        """The encoder's tokens for words back to back: each word's letters (anything else is
        ``<unk>``), then ``</s>``, as the package encodes one word."""
        index = {grapheme: i for i, grapheme in enumerate(G2P_EN_GRAPHEMES)}
        ids: list[int] = []
        for word in words:
            ids += [index.get(char, index["<unk>"]) for char in word.lower()] + [index["</s>"]]
        return ids

    def features(self, samples: list[list[str]], steps: int) -> Tensor:
        """The encoder's inputs ``(T, B, 256)`` float32: for each sample the embedded tokens of its
        words (:meth:`token_ids`), the first ``steps`` of them."""
        return embedded(self.weights["enc_emb"], [self.token_ids(words) for words in samples], steps, "tokens")


def g2p_en_words() -> list[str]:
    """The headwords of the installed g2p-en's homograph list (``g2p_en/homographs.en``), in order."""
    path = package_file("g2p-en", _G2P_EN_WORDS, _G2P_EN_INSTALL)
    lines = path.read_text(encoding="utf8").splitlines()
    return [line.split("|")[0].lower() for line in lines if line and not line.startswith("#")]


# -- g2pM -----------------------------------------------------------------------------------------
_G2PM_INSTALL = "pip install --no-deps g2pM (its checkpoint and dictionaries are all that is read)"
_G2PM_SHAPES = {
    "embedding.weight": (5398, 64),
    **{f"lstm.{name}{suffix}": shape for suffix in ("", "_reverse")
       for name, shape in (("weight_ih_l0", (128, 64)), ("weight_hh_l0", (128, 32)), ("bias_ih_l0", (128,)),
                           ("bias_hh_l0", (128,)))},
}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles NumPy arrays and built-in containers; refuses every other class (a pickle can
    run code, so only the names an array's reconstruction needs are admitted)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: only NumPy arrays are expected")


def read_pickled_arrays(path: str | Path) -> object:
    """A pickle file of NumPy arrays, dicts, lists and strings (:class:`_ArraysOnly`), or :class:`InputError`."""
    try:
        with open(path, "rb") as handle:
            return _ArraysOnly(handle).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise InputError(f"{path}: not a pickle of NumPy arrays ({error})") from None


@dataclass(frozen=True)
class G2pMandarin:
    """g2pM's bidirectional LSTM: ``weights`` (float32) by the checkpoint's names (``torch.nn``'s,
    with the prefixes ``embedding.`` and ``lstm.``) and its character index ``char2idx``."""

    weights: dict[str, Tensor]
    char2idx: dict[str, int]

    def __post_init__(self) -> None:
        check_arrays(self.weights, _G2PM_SHAPES, "g2pM's checkpoint")
        if "<UNK>" not in self.char2idx:
            raise InputError("the character index has no '<UNK>': not g2pM's char2idx")

    @classmethod
    def from_package(cls) -> "G2pMandarin":
        checkpoint = read_pickled_arrays(package_file("g2pM", "g2pM/np_ckpt.pkl", _G2PM_INSTALL))
        index = read_pickled_arrays(package_file("g2pM", "g2pM/char2idx.pkl", _G2PM_INSTALL))
        if not isinstance(checkpoint, dict) or not isinstance(index, dict):
            raise InputError("g2pM's files do not hold dicts: not the expected package")
        import numpy as np

        weights = {name: torch.from_numpy(np.asarray(value, dtype=np.float32)) for name, value in checkpoint.items()
                   if name in _G2PM_SHAPES}
        return cls(weights, dict(index))

    def network(self, dtype: torch.dtype = torch.float32) -> Network:
        """The bidirectional LSTM, one layer, ``I = 64``, ``H = 32``."""
        state = {name.removeprefix("lstm."): value for name, value in self.weights.items() if name.startswith("lstm.")}
        return Network.from_state_dict(state, kind="lstm", dtype=dtype)

    def token_ids(self, words: list[str]) -> list[int]:
        """The characters of ``words`` back to back, by the package's index (``<UNK>`` if absent)."""
        unknown = self.char2idx["<UNK>"]
        return [self.char2idx.get(char, unknown) for word in words for char in word]

    def features(self, samples: list[list[str]], steps: int) -> Tensor:
        """The LSTM's inputs ``(T, B, 64)`` float32: each sample's embedded characters, the first ``steps``."""
        return embedded(self.weights["embedding.weight"], [self.token_ids(words) for words in samples], steps, "characters")


def g2pm_words() -> list[str]:
    """The words of the installed g2pM's dictionary (``g2pM/digest_cedict.pkl``) written in Chinese
    characters only, in the file's order."""
    dictionary = read_pickled_arrays(package_file("g2pM", "g2pM/digest_cedict.pkl", _G2PM_INSTALL))
    if not isinstance(dictionary, dict):
        raise InputError("g2pM's dictionary is not a dict: not the expected package")
    return [word for word in dictionary if isinstance(word, str) and word and all("\u4e00" <= c <= "\u9fff" for c in word)]
