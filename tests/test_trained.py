"""fixedpoint.trained, on a stand-in: a TorchScript model with silero-vad's layout and random
weights, whose own forward (torch.nn modules, one LSTMCell step per chunk) is the reference.
The real package is measured by analysis/trained_networks.py (make trained), not in CI."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fixedpoint import InputError
from fixedpoint.trained import SILERO_CHUNK, SILERO_CONTEXT, MissingPackage, SileroVAD, package_file

# The stand-in is written with TorchScript, as the package ships its model; torch 2.13 deprecates it.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class _Part(nn.Module):
    """A container of weights; TorchScript needs every module to have a forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Stft(_Part):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("forward_basis_buffer", 0.05 * torch.randn(258, 1, 256))


class _Conv(_Part):
    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.reparam_conv = nn.Conv1d(inputs, outputs, 3, padding=1)


class _Decoder(_Part):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTMCell(128, 128)
        self.decoder = nn.Sequential(nn.Dropout(0.1), nn.ReLU(), nn.Conv1d(128, 1, 1), nn.Sigmoid())


class _Model(_Part):
    def __init__(self) -> None:
        super().__init__()
        self.stft = _Stft()
        self.encoder = nn.Sequential(_Conv(129, 128), _Conv(128, 64), _Conv(64, 64), _Conv(64, 128))
        self.encoder[1].reparam_conv.stride = (2,)
        self.encoder[2].reparam_conv.stride = (2,)
        self.decoder = _Decoder()


class StandIn(nn.Module):
    """``reference``: speech probability per 512-sample chunk, ``(B, N) → (T, B)``, written
    independently of the code under test; ``forward`` only makes the module scriptable."""

    def __init__(self) -> None:
        super().__init__()
        self._model = _Model()

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return audio

    @torch.jit.ignore
    def reference(self, audio: torch.Tensor) -> torch.Tensor:
        batch = audio.shape[0]
        steps = (audio.shape[1] + SILERO_CHUNK - 1) // SILERO_CHUNK
        audio = nn.functional.pad(audio, (SILERO_CONTEXT, steps * SILERO_CHUNK - audio.shape[1]))
        h = torch.zeros(batch, 128)
        c = torch.zeros(batch, 128)
        out = []
        for step in range(steps):
            window = audio[:, step * SILERO_CHUNK : (step + 1) * SILERO_CHUNK + SILERO_CONTEXT].unsqueeze(1)
            x = nn.functional.conv1d(nn.functional.pad(window, (0, 64), mode="reflect"),
                                     self._model.stft.forward_basis_buffer, stride=128)
            x = torch.sqrt(x[:, :129] ** 2 + x[:, 129:] ** 2)
            for layer in self._model.encoder:
                x = torch.relu(layer.reparam_conv(x))
            h, c = self._model.decoder.rnn(x.squeeze(-1), (h, c))
            out.append(self._model.decoder.decoder[3](self._model.decoder.decoder[2](torch.relu(h).unsqueeze(-1)))[:, 0, 0])
        return torch.stack(out)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    model = StandIn().eval()
    path = tmp_path_factory.mktemp("silero") / "model.jit"
    torch.jit.save(torch.jit.script(model), str(path))
    return model, path


def test_loaded_network_with_encoder_and_head_reproduces_the_model(stand_in):
    model, path = stand_in
    vad = SileroVAD.from_torchscript(path)
    audio = 0.3 * torch.randn(2, 5 * SILERO_CHUNK + 100, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.reference(audio)
        features = vad.features(audio)
        hidden, _ = vad.network().to_torch()(features)
    assert features.shape == (6, 2, 128)
    torch.testing.assert_close(vad.speech_probability(hidden), expected, rtol=0, atol=1e-5)
    assert vad.network(torch.float64).dtype == torch.float64


def test_bad_files_and_audio_are_refused(stand_in, tmp_path):
    _, path = stand_in
    text = tmp_path / "not-a-model.jit"
    text.write_text("hello")
    with pytest.raises(InputError, match="not a TorchScript model"):
        SileroVAD.from_torchscript(text)
    other = tmp_path / "other.jit"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(other))
    with pytest.raises(InputError, match="not silero-vad's model"):
        SileroVAD.from_torchscript(other)
    vad = SileroVAD.from_torchscript(path)
    with pytest.raises(InputError, match="shape"):
        SileroVAD({**vad.weights, "conv1.bias": torch.zeros(3)})
    with pytest.raises(InputError, match="audio must be"):
        vad.features(torch.zeros(100))
    with pytest.raises(InputError, match="rate must be one of"):
        SileroVAD.from_torchscript(path, rate=44100)
    with pytest.raises(InputError, match="not silero-vad's model"):
        SileroVAD.from_torchscript(path, rate=8000)  # the stand-in has no 8 kHz model
    with pytest.raises(MissingPackage, match="not installed"):
        package_file("no-such-distribution-here", "x", "pip install it")
