"""Shared timing for the benchmarks: rotating best-of-N windows.

Each candidate is timed in several short windows, the candidates taking turns in a rotating order, and its best
window counts (as `timeit` advises). On a small machine a runtime measured just after another one is slowed by the
other's idle worker threads; taking turns and keeping the best window removes that bias from every side alike.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable


def cpu_line(*details: str) -> str:
    """The first line every benchmark prints: the CPU, torch and its thread count, then `details`, so that no
    figure is ever read without the machine it was measured on."""
    import torch
    from mobilenetv2.deploy.timing import cpu_description

    return "; ".join([f"CPU: {cpu_description()}", f"torch {torch.__version__}, {torch.get_num_threads()} threads",
                      *details])


def window_rate(run: Callable[[], object], items_per_call: int, seconds: float, sync=lambda: None) -> float:
    """Items per second over one window of at least `seconds`, after two warm-up calls."""
    run()
    run()
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        count += items_per_call
    sync()
    return count / (time.perf_counter() - start)


def best_rates(runs: dict[str, Callable[[], object]], items_per_call: int, seconds: float, rounds: int,
               sync=lambda: None) -> dict[str, float]:
    names = list(runs)
    rates = {name: 0.0 for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            rates[name] = max(rates[name], window_rate(runs[name], items_per_call, seconds, sync))
    return rates


def timing_parser(description: str, seconds: float) -> argparse.ArgumentParser:
    """An argument parser with the shared timing options (`--seconds` per window, `--rounds` windows)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seconds", type=float, default=seconds, help="length of one timed window")
    parser.add_argument("--rounds", type=int, default=3, help="windows per candidate")
    return parser
