"""Device, precision, denormal and RNG decisions, all on CPU."""

import pytest
import torch

from mobilenetv2 import runtime
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
