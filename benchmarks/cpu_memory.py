"""What keeping freed memory in glibc's heap (mobilenetv2.cpu_memory, set by the runtime for CPU runs) is worth to
our CPU train step: images/s, page faults and system time per step, and peak memory, first with glibc's own
adaptive thresholds, then with ours, in the same process (glibc cannot go back to its adaptive thresholds, so the
two phases run in that order, each its best of N windows).

    python benchmarks/cpu_memory.py [--shapes 224,demo] [--seconds 4] [--rounds 3]
"""

from __future__ import annotations

import resource

import mobilenetv2.runtime
from mobilenetv2.cpu_memory import keep_freed_memory
from timing import best_rates, cpu_line, timing_parser
from train_throughput import SHAPES, ours, photo_batches


def phase(run, batch: int, seconds: float, rounds: int) -> dict[str, float]:
    """Best images/s over `rounds` windows, with page faults and system seconds per step over all of them."""
    before, calls = resource.getrusage(resource.RUSAGE_SELF), run.calls
    rate = best_rates({"step": run}, batch, seconds, rounds)["step"]
    after, steps = resource.getrusage(resource.RUSAGE_SELF), run.calls - calls
    return {"rate": rate, "faults": (after.ru_minflt - before.ru_minflt) / steps,
            "system": (after.ru_stime - before.ru_stime) / steps, "peak_mib": after.ru_maxrss / 1024}


def main() -> None:
    parser = timing_parser(__doc__.splitlines()[0], seconds=4.0)
    parser.add_argument("--shapes", default="224,demo", help="224 (batch 32, width 1.0) and/or demo (48 px, batch "
                        "128, width 0.5)")
    args = parser.parse_args()
    print(cpu_line(f"best of {args.rounds} windows of {args.seconds:g} s", "glibc default first, then kept"),
          flush=True)
    shapes = args.shapes.split(",")
    runs = {}
    setting = mobilenetv2.runtime.keep_freed_memory
    mobilenetv2.runtime.keep_freed_memory = lambda: False  # glibc's own thresholds for the first phase
    try:
        for shape in shapes:
            size, batch, width, classes = SHAPES[shape]
            runs[shape] = ours("cpu", "off", photo_batches(batch, size), classes, width)
    finally:
        mobilenetv2.runtime.keep_freed_memory = setting
    results = {shape: {"glibc default": phase(runs[shape], SHAPES[shape][1], args.seconds, args.rounds)}
               for shape in shapes}
    kept = keep_freed_memory()
    for shape in shapes:
        results[shape]["kept"] = phase(runs[shape], SHAPES[shape][1], args.seconds, args.rounds)
    print(f"\nglibc took the settings: {kept}")
    print("| shape | malloc | images/s | vs glibc default | page faults / step | system s / step | peak MiB so far |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        size, batch, width, _ = SHAPES[shape]
        base = results[shape]["glibc default"]["rate"]
        for name, row in results[shape].items():
            print(f"| {size} px, batch {batch}, width {width} | {name} | {row['rate']:.1f} | {row['rate'] / base:.2f}x "
                  f"| {row['faults']:.0f} | {row['system']:.3f} | {row['peak_mib']:.0f} |")
    print("\nloss, first step -> last: " + "; ".join(f"{shape} {runs[shape].losses[0]:.3f} -> "
                                                     f"{runs[shape].losses[-1]:.3f}" for shape in shapes))


if __name__ == "__main__":
    main()
