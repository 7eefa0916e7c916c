"""Model statistics as Triton reports them (`GET /v2/models/NAME/stats`, gRPC ModelStatistics): requests that
succeeded and failed with their total time, and per stage (queue, compute_input, compute_infer, compute_output) a
count and cumulative nanoseconds; per batch size the model calls made. Updated on the event loop only."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

STAGES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(0, int(ns))


@dataclass
class Timing:
    """One request's stages, filled as it goes (nanoseconds)."""
    started: int = field(default_factory=time.perf_counter_ns)
    input_ns: int = 0
    queue_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0


class Statistics:
    def __init__(self, name: str, version: str):
        self.name, self.version = name, version
        self.stages = {stage: Duration() for stage in STAGES}
        self.batches: dict[int, dict[str, Duration]] = {}
        self.inference_count = self.execution_count = self.last_inference_ms = 0

    def batch(self, size: int, infer_ns: int) -> None:
        """One model call on `size` images."""
        self.execution_count += 1
        self.inference_count += size
        self.last_inference_ms = int(time.time() * 1000)
        stats = self.batches.setdefault(size, {stage: Duration() for stage in ("compute_input", "compute_infer",
                                                                               "compute_output")})
        stats["compute_infer"].add(infer_ns)
        stats["compute_input"].add(0)  # the inputs are prepared per request, before the batch forms
        stats["compute_output"].add(0)

    def request(self, timing: Timing, ok: bool) -> None:
        total = time.perf_counter_ns() - timing.started
        if not ok:
            self.stages["fail"].add(total)
            return
        self.stages["success"].add(total)
        self.stages["queue"].add(timing.queue_ns)
        self.stages["compute_input"].add(timing.input_ns)
        self.stages["compute_infer"].add(timing.infer_ns)
        self.stages["compute_output"].add(timing.output_ns)

    def to_dict(self) -> dict:
        """One entry of Triton's `model_stats` list (its JSON spelling: durations as {"count", "ns"})."""
        return {"name": self.name, "version": self.version, "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "inference_stats": {stage: vars(d).copy() for stage, d in self.stages.items()},
                "batch_stats": [{"batch_size": size, **{stage: vars(d).copy() for stage, d in stats.items()}}
                                for size, stats in sorted(self.batches.items())]}
