"""Trained networks as a study set: every solver, the predictions beside what happened, forward errors.

For each trained network of :mod:`fixedpoint.trained` on real inputs — for silero-vad speech
synthesised with espeak-ng (the Debian package) at the model's rate, B utterances of different
voices and texts; for g2p-en the package's own word list — and each dtype: iterations, result, time against ``torch.nn`` (same process, medians),
the largest error against the float64 sequential loop, the forward-error estimate, and the
predictability estimates before solving (256-step prefix) and along the solution, beside the
observed iteration counts.  ``torch.nn``'s own float32 output gets the same error measurement.

Before anything else it checks the loading: the network, with the package's encoder and head,
must reproduce the package's own model output on the same audio.

Writes ``figures/trained_networks.json``, ``figures/trained_networks.png`` and the generated part
of ``docs/trained_networks.md``.  Needs the ``trained`` extra (silero-vad, g2p-en) and espeak-ng.
``--networks`` measures a subset and keeps the other networks' earlier results.  Of a
bidirectional network the forward direction's LSTM is studied (the loading check covers both).

    python analysis/trained_networks.py [--quick] [--out DIR] [--budget SECONDS] [--networks silero-16k,g2p-en]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import torch
from scipy.signal import resample_poly

from _common import add_output_arguments, metadata, output_directory, write_and_reload, write_generated_section
from fixedpoint import Anderson, Network, Newton, Picard, QuasiNewton, SequenceSystem, solve
from fixedpoint.forward_error import forward_error_estimate
from fixedpoint.plotting import plot_trained_networks
from fixedpoint.predictability import predictability
from fixedpoint.runtime import timed
from fixedpoint.solvers import Auto, Sequential
from fixedpoint.solvers.auto import quasi_newton_pays
from fixedpoint.trained import (
    SILERO_CHUNK, SILERO_RATE, G2pEnglish, G2pMandarin, SileroVAD, g2p_en_words, g2pm_words, package_file,
)

UTTERANCES = [
    ("en-us", 160, "Parallel evaluation of a recurrent network treats the whole sequence as one system of "
                   "equations. Whether that pays off depends on how long the network remembers."),
    ("en-gb", 140, "The weather turned cold in the evening, and the travellers stopped at a small inn by "
                   "the river, where a fire was burning and supper was ready."),
    ("en-us+f3", 175, "Seven hundred and forty two. Nine. Thirty one thousand. The numbers were read out "
                      "slowly, one after another, while the clerk wrote them down."),
    ("en-gb+m3", 120, "Speech comes in bursts with pauses between them, and a voice activity detector must "
                      "follow both the sound and the silence."),
]

SOLVERS = {
    "picard": Picard,
    "anderson": Anderson,
    "quasi-newton": QuasiNewton,
    "newton": Newton,
    "damped": lambda: Newton(damping="backtracking"),
    "lm-newton": lambda: Newton(damping="levenberg-marquardt"),
    "damped-quasi-newton": lambda: Newton(jacobian="diagonal", damping="backtracking"),
    "lm-quasi-newton": lambda: Newton(jacobian="diagonal", damping="levenberg-marquardt"),
}


class OverBudget(Exception):
    """A solve ran past its time budget (raised from its callback)."""


def synthesise(seq_len: int, batch: int, workdir: Path, rate: int = SILERO_RATE, chunk: int = SILERO_CHUNK) -> torch.Tensor:
    """``(B, seq_len · chunk)`` float32 audio at ``rate``: each row one voice reading its text,
    repeated with a short pause until it fills the length."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed: apt-get install espeak-ng")
    rows = []
    samples = seq_len * chunk
    for index in range(batch):
        voice, speed, text = UTTERANCES[index % len(UTTERANCES)]
        path = workdir / f"utterance{index}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True)
        with wave.open(str(path)) as handle:
            speaker_rate = handle.getframerate()
            audio = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2").astype(np.float64) / 32768
        audio = resample_poly(audio, rate, speaker_rate)
        pause = np.zeros(rate // 2)
        repeated = np.concatenate([np.concatenate([audio, pause])] * (samples // (audio.size + pause.size) + 1))
        rows.append(repeated[:samples])
    return torch.from_numpy(np.stack(rows)).float()


def check_loading(vad: SileroVAD, audio: torch.Tensor) -> float:
    """Largest difference between the package's own model and ours (encoder, LSTM, head) over every
    chunk of the first utterance, float32."""
    model = torch.jit.load(str(package_file("silero-vad", "silero_vad/data/silero_vad.jit", "")), map_location="cpu")
    model.reset_states()
    with torch.no_grad():
        theirs = torch.tensor([float(model(chunk.unsqueeze(0), vad.rate))
                               for chunk in audio[0].split(vad.layout.chunk)])
        hidden, _ = vad.network().to_torch()(vad.features(audio[:1]))
    ours = vad.speech_probability(hidden)[:, 0]
    return float((theirs - ours).abs().max())


def check_g2p_en_loading(encoder: G2pEnglish, words: list[str], steps: int) -> float:
    """Largest difference between the package's own NumPy GRU (``G2p.gru``, on its own embedding
    of the same tokens) and ``torch.nn.GRU`` with the weights read here, float32."""
    import g2p_en.g2p as package  # prints nltk's failed downloads offline; the encoder needs none

    theirs = package.G2p.__new__(package.G2p)  # without __init__, which loads nltk's dictionary
    theirs.load_variables()
    ids = np.array(encoder.token_ids(words)[:steps])
    reference = theirs.gru(theirs.enc_emb[ids][None], steps, theirs.enc_w_ih, theirs.enc_w_hh, theirs.enc_b_ih,
                           theirs.enc_b_hh, h0=np.zeros((1, 256), np.float32))
    with torch.no_grad():
        hidden, _ = encoder.network().to_torch()(encoder.features([words], steps))
    return float(np.abs(hidden[:, 0].numpy() - reference[0]).max())


def check_g2pm_loading(model: G2pMandarin, words: list[str], steps: int) -> float:
    """Largest difference between the package's own NumPy LSTM cells (``G2pM.fw_lstm_cell`` and
    ``bw_lstm_cell``, on its own embedding of the same characters) and ``torch.nn.LSTM`` with the
    weights read here, float32, both directions."""
    from g2pM import G2pM

    theirs = G2pM()
    ids = np.array(model.token_ids(words)[:steps])
    forward = theirs.get_embedding(ids[None])
    backward = forward[:, ::-1]
    fw, bw, fw_states, bw_states = [], [], None, None
    for t in range(steps):
        fw_states = theirs.fw_lstm_cell(forward[:, t], fw_states)
        bw_states = theirs.bw_lstm_cell(backward[:, t], bw_states)
        fw.append(fw_states[0][0])
        bw.append(bw_states[0][0])
    reference = np.concatenate([np.stack(fw), np.stack(bw)[::-1]], axis=-1)
    with torch.no_grad():
        output, _ = model.network().to_torch()(model.features([words], steps))
    return float(np.abs(output[:, 0].numpy() - reference).max())


def study(network_of, features: torch.Tensor, dtype: torch.dtype, budget: float) -> dict:  # type: ignore[no-untyped-def]
    network = network_of(dtype)
    cell = network.cells[0][0]
    inputs = features.to(dtype)
    system = SequenceSystem.build(cell, inputs)
    wide = SequenceSystem.build(cell.to(dtype=torch.float64), inputs.double())
    exact = wide.sequential()  # the float64 loop: the reference for every error here
    module = network.to_torch()
    with torch.no_grad():  # warm: oneDNN prepares its kernel on the first call of a shape
        (output, _), torch_seconds = timed(lambda: module(inputs), inputs.device, 5, warm=True)
    torch_states = system.states_from_hidden(output.detach())
    torch_error = float((torch_states.double() - exact).abs().max())
    torch_estimate = float(forward_error_estimate(system, torch_states).max())
    rtol, atol = Picard().tolerances(dtype)
    started = time.perf_counter()
    before = predictability(system, rtol=rtol, atol=atol)
    before_seconds = time.perf_counter() - started
    after = predictability(system, exact.to(dtype), rtol=rtol, atol=atol)
    runs = []
    for name, make in SOLVERS.items():
        deadline = time.perf_counter() + budget
        seen = {"iterations": 0}

        def stop_when_over(iteration, iterate, image, seen=seen, deadline=deadline):
            seen["iterations"] = iteration
            if time.perf_counter() > deadline:
                raise OverBudget

        started = time.perf_counter()
        try:
            solution = solve(system, make(), throw=False, callback=stop_when_over)
        except OverBudget:
            runs.append({"solver": name, "result": f"stopped after {budget:.0f} s", "iterations": seen["iterations"],
                         "converged": False, "seconds": time.perf_counter() - started})
            print(f"  {name}: stopped after {budget:.0f} s at iteration {seen['iterations']}", flush=True)
            continue
        seconds = time.perf_counter() - started
        estimate = solution.stats.forward_error_estimate
        run = {
            "solver": name, "result": solution.result.name, "converged": solution.converged,
            "iterations": solution.stats.iterations, "seconds": seconds, "time_ratio": seconds / torch_seconds,
            "error": float((solution.value.double() - exact).abs().max()),
            "forward_error_estimate": None if estimate is None else float(estimate.max()),
            "refinements": solution.stats.refinements,
            "counters": {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in solution.stats.solver.items()},
        }
        runs.append(run)
        print(f"  {name}: {run['result']} in {run['iterations']} iterations, {seconds:.2f} s "
              f"({run['time_ratio']:.0f}× torch.nn), error {run['error']:.2e}", flush=True)
    return {
        "dtype": str(dtype).removeprefix("torch."), "seq_len": system.seq_len, "batch": system.batch,
        "torch_seconds": torch_seconds, "torch_error": torch_error, "torch_forward_error_estimate": torch_estimate,
        "lyapunov": after.lyapunov.tolist(), "lyapunov_prefix": before.lyapunov.tolist(),
        "memory_length": after.memory_length.tolist(), "max_window_growth": after.max_window_growth.tolist(),
        "predicted": {m: int(v.max()) for m, v in after.predicted_iterations.items()},
        "predicted_prefix": {m: int(v.max()) for m, v in before.predicted_iterations.items()},
        "prefix_seconds": before_seconds, "runs": runs,
        "growth": after.growth[:, 0].tolist(),
    }
#: For the estimate of Auto's choice on a GPU (no GPU has run it): one quasi-Newton iteration on
#: the CUDA path launches this many kernels (counted on the CPU: docs/gpu.md), each taking 3–5 µs,
#: and cuDNN's loop takes 3–10 µs per position (docs/gpu.md's paper estimates, unmeasured).
QUASI_NEWTON_LAUNCHES = 55
LAUNCH_SECONDS = (3e-6, 5e-6)
CUDNN_STEP_SECONDS = (3e-6, 10e-6)


def auto_on_gpu(problem: dict) -> tuple[str, str]:
    """``(choice, why)``: what ``Auto``'s rule would choose on a GPU for this problem, with the
    GPU times it would measure replaced by the estimated ranges above.  Auto predicts the
    quasi-Newton count from a 256-step prefix, as ``predicted_prefix`` was."""
    steps = problem["seq_len"]
    expected = problem["predicted_prefix"]["quasi-newton"]
    calibration = Auto().calibration_steps
    if steps <= calibration:
        return "cuDNN", f"T = {steps} ≤ {calibration}: the sequential kernel without calibration"
    # The rule at the ends of the ranges: the most and the least favourable to quasi-Newton.
    fastest = QUASI_NEWTON_LAUNCHES * LAUNCH_SECONDS[0], steps * CUDNN_STEP_SECONDS[1]
    slowest = QUASI_NEWTON_LAUNCHES * LAUNCH_SECONDS[1], steps * CUDNN_STEP_SECONDS[0]
    most, least = fastest[1] / fastest[0], slowest[1] / slowest[0]  # break-even iteration counts
    if not quasi_newton_pays(expected, *fastest):
        return "cuDNN", f"{expected} quasi-Newton iterations predicted; it pays only below {most:.0f}"
    if quasi_newton_pays(expected, *slowest):
        return "quasi-Newton", f"{expected} iterations predicted, under {least:.0f}"
    return "either (timing decides)", f"{expected} iterations predicted, between {least:.0f} and {most:.0f}"


def summary_table(data: dict) -> list[str]:
    """One row per network and dtype: Auto's GPU choice, observed (predicted from the prefix)
    iterations per solver, the solves' and ``torch.nn``'s forward errors."""
    solvers = list(SOLVERS)
    lines = ["| network | dtype | `Auto` on a GPU (estimate): why | " + " | ".join(solvers)
             + " | largest error of a converged solve | `torch.nn`'s error (estimate) |",
             "|---|---|---|" + "---|" * len(solvers) + "---|---|"]
    for network in data["networks"]:
        for problem in network["problems"]:
            choice, why = auto_on_gpu(problem)
            runs = {run["solver"]: run for run in problem["runs"]}
            cells = []
            for name in solvers:
                run = runs.get(name)
                if run is None:
                    cells.append("—")
                    continue
                observed = f"{run['iterations']}" if run["converged"] else f"stopped at {run['iterations']}"
                predicted = problem["predicted_prefix"].get(name)
                cells.append(observed if predicted is None else f"{observed} ({predicted})")
            errors = [run["error"] for run in problem["runs"] if run["converged"]]
            lines.append(f"| {network['name'].split(' (')[0]} | {problem['dtype']} | **{choice}**: {why} | "
                         + " | ".join(cells) + f" | {max(errors):.1e} | {problem['torch_error']:.1e} "
                         f"({problem['torch_forward_error_estimate']:.1e}) |")
    return lines


def write_doc(data: dict) -> None:
    meta = data["meta"]
    lines = [f"## Measured ({meta['date'][:10]}, {meta['platform']}, torch {meta['torch']}, "
             f"{meta['torch_threads']} thread(s))", "",
             "### The targets in one table", "",
             f"Iterations observed, and in brackets predicted from a 256-step prefix before solving; "
             f"'stopped' means the {meta.get('budget_seconds', 60):.0f} s budget ran out. `Auto` keeps "
             "the fused kernel on a CPU; its choice on a GPU is the rule of `fixedpoint/solvers/auto.py` "
             "with the GPU times it would measure replaced by estimated ranges (cuDNN 3–10 µs per "
             f"position; a quasi-Newton iteration {QUASI_NEWTON_LAUNCHES} launches of 3–5 µs): an estimate, "
             "unmeasured on a GPU. Errors are against the float64 loop.", ""]
    lines += summary_table(data) + [""]
    for network in data["networks"]:
        quantity = network.get("loading_quantity", "speech probability")
        lines += [f"### {network['name']} (measured {network.get('date', meta['date'][:10])})", "", f"Inputs: {network.get('inputs', 'espeak-ng speech')}. Loading check: "
                  f"the package's own model and this reconstruction differ by at most {network['loading_check']:.1e} "
                  f"in {quantity} over {network['loading_steps']} steps (float32).", ""]
        for problem in network["problems"]:
            lam = max(problem["lyapunov"])
            lines += [f"**{problem['dtype']}, T = {problem['seq_len']}, B = {problem['batch']}** — largest Lyapunov "
                      f"exponent {lam:+.4f}/step (from a 256-step prefix: {max(problem['lyapunov_prefix']):+.4f}), "
                      f"memory {max(problem['memory_length']):.3g} steps, largest growth over 50 steps "
                      f"{max(problem['max_window_growth']):.3g}×; `torch.nn` {problem['torch_seconds'] * 1e3:.1f} ms, "
                      f"its error against the float64 loop {problem['torch_error']:.1e} (estimate "
                      f"{problem['torch_forward_error_estimate']:.1e}). All estimates are labelled so.", "",
                      "| solver | result | iterations | predicted (solution / prefix) | time ÷ torch.nn | error | "
                      "forward-error estimate |", "|---|---|---|---|---|---|---|"]
            for run in problem["runs"]:
                method = run["solver"] if run["solver"] in problem["predicted"] else None
                predicted = (f"{problem['predicted'][method]} / {problem['predicted_prefix'][method]}"
                             if method else "—")
                ratio = f"{run['time_ratio']:.0f}×" if "time_ratio" in run else "—"
                error = f"{run['error']:.1e}" if "error" in run else "—"
                estimate = run.get("forward_error_estimate")
                lines.append(f"| {run['solver']} | {run['result']} | {run['iterations']} | {predicted} | {ratio} | "
                             f"{error} | {'—' if estimate is None else f'{estimate:.1e}'} |")
            lines.append("")
    lines += ["Figure: `figures/trained_networks.png`.", ""]
    write_generated_section("trained_networks.md", "analysis/trained_networks.py", lines)


#: The study set: name → what ``main`` measures.
NETWORKS = ("silero-16k", "silero-8k", "g2p-en", "g2pm")


def measure(key: str, seq_len: int, batch: int, budget: float) -> dict:
    """Load one network, check the loading against its package, and study it in both dtypes."""
    if key.startswith("silero"):
        rate = 16000 if key == "silero-16k" else 8000
        vad = SileroVAD.from_package(rate)
        with tempfile.TemporaryDirectory() as workdir:
            audio = synthesise(seq_len, batch, Path(workdir), rate, vad.layout.chunk)
        loading = check_loading(vad, audio)
        name, network_of, features = f"silero-vad {rate // 1000} kHz LSTM (I = H = 128)", vad.network, vad.features(audio)
        inputs = "espeak-ng speech, silero-vad's encoder"
        check = "speech probability"
    elif key == "g2pm":
        model = G2pMandarin.from_package()
        words = g2pm_words()
        samples = [words[index::batch] for index in range(batch)]
        loading = check_g2pm_loading(model, samples[0], seq_len)
        def network_of(dtype: torch.dtype) -> Network:  # the forward direction alone
            return Network(((model.network(dtype).cells[0][0],),))

        name, features = "g2pM BiLSTM, forward direction (I = 64, H = 32)", model.features(samples, seq_len)
        inputs = "the characters of g2pM's own dictionary (digest_cedict.pkl) in the file's order: real characters, not sentences"
        check = "hidden state, both directions"
    else:
        encoder = G2pEnglish.from_package()
        words = g2p_en_words()
        samples = [words[index::batch] for index in range(batch)]  # B streams of the package's words
        loading = check_g2p_en_loading(encoder, samples[0], seq_len)
        name, network_of, features = "g2p-en encoder GRU (I = H = 256)", encoder.network, encoder.features(samples, seq_len)
        inputs = "g2p-en's own word list (homographs.en), each word's letters and </s>, back to back"
        check = "encoder state"
    print(f"{name}: package model against the reconstruction: {loading:.2e}", flush=True)
    problems = []
    for dtype in (torch.float64, torch.float32):
        print(f"{name}, {dtype}, T = {seq_len}, B = {batch}", flush=True)
        problems.append(study(network_of, features, dtype, budget))
    return {"key": key, "name": name, "inputs": inputs, "loading_check": loading, "loading_quantity": check,
            "loading_steps": seq_len, "problems": problems, "date": datetime.date.today().isoformat()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_arguments(parser)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per solve before it is stopped (60)")
    parser.add_argument("--networks", default=",".join(NETWORKS),
                        help=f"comma-separated subset of {','.join(NETWORKS)}; the others keep their earlier results")
    args = parser.parse_args()
    chosen = [key for key in args.networks.split(",") if key]
    unknown = sorted(set(chosen) - set(NETWORKS))
    if unknown:
        parser.error(f"unknown networks {unknown}; choose from {','.join(NETWORKS)}")
    out = output_directory(args, "trained-")
    seq_len, batch = (64, 2) if args.quick else (500, 4)
    previous_path = out / "trained_networks.json"
    earlier = {}
    if previous_path.exists() and not args.quick:
        previous = json.loads(previous_path.read_text())
        earlier = {entry.get("key", _key_of(entry["name"])): {"date": previous["meta"]["date"][:10], **entry}
                   for entry in previous["networks"]}
    measured = {key: measure(key, seq_len, batch, args.budget) for key in chosen}
    networks = [measured[key] if key in measured else earlier[key] for key in NETWORKS if key in measured or key in earlier]
    data = {
        "meta": metadata("analysis/trained_networks.py", args.quick, {"seq_len": seq_len, "batch": batch},
                         inputs="per network (its 'inputs')", budget_seconds=args.budget),
        "networks": networks,
    }
    data = write_and_reload(out / "trained_networks.json", data)
    plot_trained_networks(data, out / "trained_networks.png")
    if not args.quick and args.out is None:
        write_doc(data)


def _key_of(name: str) -> str:
    """The key of a network named in an earlier file that predates keys."""
    return "silero-16k" if "16 kHz" in name else "silero-8k" if "8 kHz" in name else name


if __name__ == "__main__":
    main()
