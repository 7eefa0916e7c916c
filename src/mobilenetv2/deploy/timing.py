"""Timing runtimes on this machine, shared by `bench` and by `quantize` (which times its int8 layouts): calls taken
in interleaved rounds, so that a slow spell of a shared machine falls on every candidate alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

ROUNDS = 5  # rounds per measurement; each candidate is timed once per round, in turn


def timed(run: Callable[[], object], seconds: float, at_least: int = 1) -> list[float]:
    """Latencies (s) of calls to `run` for about `seconds`, and at least `at_least` calls."""
    latencies, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < at_least:
        begin = time.perf_counter()
        run()
        latencies.append(time.perf_counter() - begin)
    return latencies


def interleaved(calls: dict[str, Callable[[], object]], seconds: float) -> dict[str, list[float]]:
    """Latencies of each call, after three warm-up calls each, timed for `seconds` in all over ROUNDS rounds taken
    in turn."""
    for call in calls.values():
        timed(call, 0, at_least=3)
    latencies: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(ROUNDS):
        for name, call in calls.items():
            latencies[name] += timed(call, seconds / ROUNDS)
    return latencies


def onnx_runner(path: Path, threads: int):
    """A callable(images: torch.Tensor) running the ONNX file with ONNX Runtime's CPU provider on `threads`."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(["logits"], {"input": images.numpy()})
