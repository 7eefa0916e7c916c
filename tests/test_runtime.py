"""Device, precision, denormal, memory and RNG decisions, all on CPU."""

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import forked
from mobilenetv2 import cpu_memory, runtime
from mobilenetv2.errors import UserError
from mobilenetv2.runtime import Runtime, resolve_amp, resolve_device


def test_amp_auto_is_fp32_on_cpu_and_bf16_on_capable_gpus(monkeypatch):
    assert resolve_amp("auto", torch.device("cpu")) is None
    assert resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(UserError):
        resolve_amp("fp16", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp("auto", torch.device("cuda", 0)) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp("auto", torch.device("cuda", 0)) is None
    assert resolve_amp("fp16", torch.device("cuda", 0)) is torch.float16


def test_device_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(UserError):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(UserError, match="only 2 GPU"):
        resolve_device("cuda:5")


def test_cpu_runtime_flushes_denormals():
    try:
        torch.set_flush_denormal(False)
        assert torch.tensor([1e-323], dtype=torch.float64).item() != 0
        runtime.setup("cpu", "off")
        assert torch.tensor([1e-323], dtype=torch.float64).item() == 0
    finally:
        torch.set_flush_denormal(False)


def test_grad_scaler_only_for_fp16():
    assert not Runtime(torch.device("cpu"), None).grad_scaler().is_enabled()
    assert not Runtime(torch.device("cpu"), torch.bfloat16).grad_scaler().is_enabled()
    assert Runtime(torch.device("cpu"), torch.float16).grad_scaler().is_enabled()


def test_rng_state_round_trips_as_plain_data(tmp_path):
    runtime.seed_everything(3)
    state = runtime.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    runtime.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]


def test_a_session_undoes_what_it_set():
    torch.set_flush_denormal(False)
    with runtime.session("cpu", "off") as state:
        assert state.flushes_denormals and runtime.flushing_denormals()
    assert not runtime.flushing_denormals()
    torch.set_flush_denormal(True)  # already on before: left on
    try:
        with runtime.session("cpu", "off") as state:
            assert not state.flushes_denormals
        assert runtime.flushing_denormals()
    finally:
        torch.set_flush_denormal(False)


def test_compile_wraps_what_the_loop_trains(dataset, tmp_path, monkeypatch):
    """--compile reaches torch.compile with the training module (compiling itself is torch's; a real compile of
    even a tiny network takes a minute on two cores, so the call is recorded here instead)."""
    from mobilenetv2.cli import main

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.append(module) or module)
    assert main(["train", "--data", str(dataset), "--output", str(tmp_path / "run"), "--width-mult", "0.25",
                 "--image-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "1", "--max-steps", "1",
                 "--compile"]) == 0
    assert len(compiled) == 1 and type(compiled[0]).__name__ == "MobileNetV2"
    assert not Runtime(torch.device("cpu"), None).compile_model


def _cpu_runtime(channels_last=True):
    return Runtime(torch.device("cpu"), None, channels_last=channels_last)


def test_amp_auto_on_cpu_takes_bf16_only_where_timed_faster_by_the_margin(tmp_path, monkeypatch):
    from mobilenetv2.model import MobileNetV2

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    model = MobileNetV2(num_classes=3, width_mult=0.25)
    timings = []

    def timed(ratio):
        def fake(network, state, batch, size, classes):
            timings.append((batch, size, classes))
            return {"fp32": 100.0, "bf16": 100.0 * ratio}
        return fake

    monkeypatch.setattr(runtime, "_time_precisions", timed(2.0))
    tuned, note = runtime.tune_cpu_amp(_cpu_runtime(), "auto", model, 8, 32, 3)
    assert tuned.amp_dtype is torch.bfloat16 and note.startswith("amp auto: bf16 (") and "2.00x" in note
    assert timings == [(8, 32, 3)]
    # kept: the same question is answered from the record, without timing again
    monkeypatch.setattr(runtime, "_time_precisions", timed(0.1))
    again, note = runtime.tune_cpu_amp(_cpu_runtime(), "auto", model, 8, 32, 3)
    assert again.amp_dtype is torch.bfloat16 and "timing kept in" in note and len(timings) == 1
    # another batch, size or memory format is another question
    for batch, size, layout in ((16, 32, True), (8, 48, True), (8, 32, False)):
        other, _ = runtime.tune_cpu_amp(_cpu_runtime(layout), "auto", model, batch, size, 3)
        assert other.amp_dtype is None
    assert len(timings) == 4
    # large batches are timed at AMP_TIMING_PIXELS per batch (the seed's 256 at 224 px: 41 images), and one timing
    # answers every batch beyond that
    runtime.tune_cpu_amp(_cpu_runtime(), "auto", model, 256, 224, 3)
    _kept, note = runtime.tune_cpu_amp(_cpu_runtime(), "auto", model, 512, 224, 3)
    assert timings[4:] == [(41, 224, 3)] and "timed at batch 41, 224 px; timing kept" in note
    # faster, but by less than the margin: fp32 stays
    monkeypatch.setattr(runtime, "_time_precisions", timed(runtime.BF16_MARGIN - 0.05))
    slow, note = runtime.tune_cpu_amp(_cpu_runtime(), "auto", model, 4, 32, 3)
    assert slow.amp_dtype is None and note.startswith("amp auto: fp32")
    # a timing kept by an earlier way of training (another AMP_TIMING_METHOD) is not reused: it is timed again
    monkeypatch.setattr(runtime, "AMP_TIMING_METHOD", runtime.AMP_TIMING_METHOD + 1)
    retimed, note = runtime.tune_cpu_amp(_cpu_runtime(), "auto", model, 4, 32, 3)
    assert "timed now" in note and timings[-1] == (4, 32, 3) and timings[-2] == (4, 32, 3)


def test_amp_auto_times_nothing_without_bf16_or_when_amp_is_given(tmp_path, monkeypatch):
    from mobilenetv2.model import MobileNetV2

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(runtime, "_time_precisions", lambda *a: pytest.fail("timed"))
    model = MobileNetV2(num_classes=3, width_mult=0.25)
    for amp in ("off", "bf16"):
        state = Runtime(torch.device("cpu"), resolve_amp(amp, torch.device("cpu")))
        assert runtime.tune_cpu_amp(state, amp, model, 8, 32, 3) == (state, None)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    state, note = runtime.tune_cpu_amp(_cpu_runtime(), "auto", model, 8, 32, 3)
    assert state.amp_dtype is None and "no native bf16" in note
    gpu = Runtime(torch.device("cuda"), torch.bfloat16)
    assert runtime.tune_cpu_amp(gpu, "auto", model, 8, 32, 3) == (gpu, None)


def test_precision_timing_runs_real_steps_and_leaves_model_and_rng_alone():
    from mobilenetv2.model import MobileNetV2

    torch.manual_seed(5)
    model = MobileNetV2(num_classes=3, width_mult=0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    rates = runtime._time_precisions(model, _cpu_runtime(), 4, 32, 3)
    assert set(rates) == {"fp32", "bf16"} and min(rates.values()) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), state)


def test_training_log_says_what_amp_auto_decided(dataset, tmp_path, capsys):
    from conftest import train

    assert train(dataset, tmp_path / "run", "--epochs", "1", "--max-steps", "1") == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("amp auto: "))
    assert line in (tmp_path / "run" / "train.log").read_text()
    assert ("no native bf16" in line) != runtime.cpu_has_bf16()


def _big_tensor_faults(result_path: str, cpu_runtime: bool) -> None:
    """In a fresh process (glibc's own malloc thresholds), with or without a CPU runtime: page faults per allocation
    of a 96 MiB tensor allocated and freed again and again (as a training step's activations are), and the resident
    memory before and after the runtime's teardown, into `result_path`."""
    import resource

    def resident_mib():
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    state = runtime.setup("cpu", "off") if cpu_runtime else None
    for _ in range(8):  # the first allocations fault in any case, and with kept memory a few more may, until
        torch.ones(24 << 20)  # the heap holds a free block that fits (measured: at most the first five)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        torch.ones(24 << 20)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8
    held = resident_mib()
    runtime.teardown(state)
    Path(result_path).write_text(json.dumps({"faults": faults, "held": held, "released": resident_mib()}))


@pytest.mark.skipif(cpu_memory._glibc() is None, reason="glibc's malloc only")
def test_a_cpu_runtime_keeps_freed_activations_and_gives_them_back_on_teardown(tmp_path):
    results = {}
    for cpu_runtime in (False, True):
        path = tmp_path / f"{cpu_runtime}.json"
        process = forked(_big_tensor_faults, str(path), cpu_runtime)
        process.join(120)
        assert process.exitcode == 0
        results[cpu_runtime] = json.loads(path.read_text())
    plain, kept = results[False], results[True]
    assert plain["faults"] > 0 and kept["faults"] < plain["faults"] / 10, results  # reused, not faulted in again
    assert kept["held"] - kept["released"] > 64, results  # the freed 96 MiB goes back to the kernel on teardown
