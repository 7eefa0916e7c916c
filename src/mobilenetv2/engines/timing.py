"""Timing engines on this machine, shared by `auto`'s choice of engine, `bench` and `quantize` (which times its int8
layouts): calls taken in interleaved rounds, so that a slow spell of a shared machine falls on every candidate
alike; and the CPU named in one line beside every figure."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

ROUNDS = 5  # rounds per measurement; each candidate is timed once per round, in turn
# /proc/cpuinfo flags of the instructions that multiply-add int8 (int8 kernels are fast only with one of them)
INT8_DOT_PRODUCT = {"avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8",
                    "asimddp": "Arm dot product", "i8mm": "Arm I8MM"}


def cpu_description(cpuinfo: str | None = None) -> str:
    """This CPU in one line: its model, the vector instructions torch's kernels use here, and the int8
    dot-product instructions it has (or "none"). `cpuinfo` is /proc/cpuinfo's text (read here when None)."""
    import torch

    from mobilenetv2.runtime import cpu_fields

    fields = cpu_fields(cpuinfo)
    model = fields.get("model name") or platform.processor() or "model not listed"
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    dot = [name for flag, name in INT8_DOT_PRODUCT.items() if flag in flags]
    unlisted = " (not listed by this OS)" if not flags else ""
    return (f"{model}, {platform.machine()}, torch kernels {torch.backends.cpu.get_cpu_capability()}, "
            f"int8 dot-product instructions: {', '.join(dot) or 'none'}{unlisted}")


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
