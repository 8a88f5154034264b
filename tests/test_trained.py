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


# -- g2p-en, on a stand-in checkpoint -------------------------------------------------------------------
def _g2p_en_stand_in(path, **changes):
    import numpy as np

    generator = np.random.default_rng(0)
    arrays = {"enc_emb": (29, 256), "enc_w_ih": (768, 256), "enc_w_hh": (768, 256), "enc_b_ih": (768,), "enc_b_hh": (768,),
              "dec_emb": (74, 256), "fc_w": (74, 256)}
    values = {name: (0.1 * generator.standard_normal(shape)).astype(np.float32) for name, shape in arrays.items()}
    values.update(changes)
    values = {name: value for name, value in values.items() if value is not None}
    np.savez(path, **values)
    return values


def test_g2p_en_encoder_is_torch_nn_gru_with_the_checkpoint_s_arrays(tmp_path):
    from fixedpoint.trained import G2P_EN_GRAPHEMES, G2pEnglish

    arrays = _g2p_en_stand_in(tmp_path / "checkpoint.npz")
    encoder = G2pEnglish.from_npz(tmp_path / "checkpoint.npz")
    # The package's encoding: letters, anything else <unk>, each word closed by </s>.
    assert encoder.token_ids(["Ab", "c-d"]) == [3, 4, 2, 5, 1, 6, 2]
    assert G2P_EN_GRAPHEMES[3] == "a" and len(G2P_EN_GRAPHEMES) == 29
    features = encoder.features([["abc", "de"], ["fgh", "ij"]], 6)
    assert features.shape == (6, 2, 256)
    assert torch.equal(features[1, 1], torch.from_numpy(arrays["enc_emb"][G2P_EN_GRAPHEMES.index("g")]))
    gru = nn.GRU(256, 256)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            short = name.replace("weight", "w").replace("bias", "b")
            getattr(gru, f"{name}_l0").copy_(torch.from_numpy(arrays[f"enc_{short}"]))
        expected, _ = gru(features)
        got, _ = encoder.network().to_torch()(features)
    assert float((got - expected).abs().max()) == 0.0
    with pytest.raises(InputError, match="give more words"):
        encoder.features([["ab"]], 10)


def test_g2p_en_refuses_what_is_not_its_checkpoint(tmp_path):
    import numpy as np

    from fixedpoint.trained import G2pEnglish

    _g2p_en_stand_in(tmp_path / "short.npz", enc_w_hh=np.zeros((768, 128), np.float32))
    with pytest.raises(InputError, match="enc_w_hh has shape"):
        G2pEnglish.from_npz(tmp_path / "short.npz")
    _g2p_en_stand_in(tmp_path / "missing.npz", enc_emb=None)
    with pytest.raises(InputError, match="no array 'enc_emb'"):
        G2pEnglish.from_npz(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(InputError, match="not a NumPy"):
        G2pEnglish.from_npz(tmp_path / "text.npz")


# -- g2pM, on a stand-in checkpoint ---------------------------------------------------------------------
def _g2pm_stand_in(tmp_path, **changes):
    import pickle

    import numpy as np

    generator = np.random.default_rng(1)
    shapes = {"embedding.weight": (5398, 64), "logit_layer.0.weight": (32, 64)}
    for suffix in ("", "_reverse"):
        shapes |= {f"lstm.weight_ih_l0{suffix}": (128, 64), f"lstm.weight_hh_l0{suffix}": (128, 32),
                   f"lstm.bias_ih_l0{suffix}": (128,), f"lstm.bias_hh_l0{suffix}": (128,)}
    arrays = {name: (0.2 * generator.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}
    arrays.update(changes)
    path = tmp_path / "np_ckpt.pkl"
    path.write_bytes(pickle.dumps(arrays))
    return path, arrays


def test_g2pm_lstm_is_torch_nn_lstm_with_the_checkpoint_s_arrays(tmp_path):
    from fixedpoint.trained import G2pMandarin, read_pickled_arrays

    path, arrays = _g2pm_stand_in(tmp_path)
    weights = {name: torch.from_numpy(value) for name, value in read_pickled_arrays(path).items()}
    model = G2pMandarin(weights, {"<PAD>": 0, "<UNK>": 1, "中": 7, "文": 9})
    assert model.token_ids(["中文", "字"]) == [7, 9, 1]
    features = model.features([["中文", "中"], ["文文中"]], 3)
    assert features.shape == (3, 2, 64)
    assert torch.equal(features[2, 1], torch.from_numpy(arrays["embedding.weight"][7]))
    lstm = nn.LSTM(64, 32, bidirectional=True)
    lstm.load_state_dict({name.removeprefix("lstm."): torch.from_numpy(value)
                          for name, value in arrays.items() if name.startswith("lstm.")})
    with torch.no_grad():
        expected, _ = lstm(features)
        got, _ = model.network().to_torch()(features)
    assert float((got - expected).abs().max()) == 0.0


def test_g2pm_reads_arrays_only_and_refuses_other_checkpoints(tmp_path):
    import pickle

    import numpy as np

    from fixedpoint.trained import G2pMandarin, read_pickled_arrays

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"callable": print}))  # a pickle that names a function
    with pytest.raises(InputError, match="refusing builtins.print"):
        read_pickled_arrays(evil)
    path, _ = _g2pm_stand_in(tmp_path, **{"lstm.weight_hh_l0": np.zeros((128, 16), np.float32)})
    weights = {name: torch.from_numpy(value) for name, value in read_pickled_arrays(path).items()}
    with pytest.raises(InputError, match="lstm.weight_hh_l0 has shape"):
        G2pMandarin(weights, {"<UNK>": 1})
    with pytest.raises(InputError, match="not a pickle"):
        read_pickled_arrays(tmp_path / "missing.pkl")
