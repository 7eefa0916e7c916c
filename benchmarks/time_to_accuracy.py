"""Time to accuracy on Fashion-MNIST at the demo's width: recipes trained from scratch, several seeds each, in one
run on one CPU (named in the first line), the recipes taking turns seed by seed so that a host that slows down
slows them alike.

Each run is `mobilenetv2 train` in a child process (forked from a server that imported torch and the package once)
with an evaluation after every epoch (not counted as training time: each epoch record's time_s covers its steps
only). Per recipe: final top-1 (min / median / max over seeds), training wall time, the training time at which
top-1 first reached the target (after the first epoch whose eval reached it), and the training compute in
image-pixels (images x crop side squared, summed over the epochs' recorded train_size). Ratios are against the first
recipe (today's demo recipe) in the same run.

    python benchmarks/time_to_accuracy.py [--seeds 1,2,3] [--recipes demo-8-epochs,demo] [--target 0.91]
        [--per-class N --val-per-class N]   (a subset, for a smoke run)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from timing import cpu_line

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "fashion_mnist.yaml"
# the demo's recipe until 2026-12-07 (8 epochs at 48 px, crops of 85-100 %, cosine), as overrides of the demo's file
RECIPES = {
    "demo-8-epochs": ["--epochs", "8", "--min-scale", "0.85", "--lr-schedule", "cosine", "--eval-tta", "none",
                      "--progressive-resize", "", "--progressive-ramp", ""],
    # configs/fashion_mnist.yaml as it stands: 5 epochs, no crops, linear decay, flip TTA in the eval
    "demo": [],
    "demo-no-tta": ["--eval-tta", "none"],  # the same training, each test image seen once
    # the same with its first epoch at 36 px (progressive resizing): 0.74 of a 48-px epoch's step time
    "demo-progressive": ["--progressive-resize", "36:48", "--progressive-ramp", "0:1", "--progressive-multiple", "4"],
}


def _train(argv: list[str]) -> None:
    """`mobilenetv2 train ARGV` in the child, what it prints discarded; its exit code is the child's."""
    from mobilenetv2.cli import main

    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        sys.exit(main(argv))


# a fresh process per run, as the command would be, without the seconds a fresh interpreter spends importing torch
CHILDREN = multiprocessing.get_context("forkserver")
CHILDREN.set_forkserver_preload(["torch", "torchvision", "mobilenetv2.cli", "mobilenetv2.training.run"])


def run_once(recipe: str, seed: int, data: Path, work: Path, extra: list[str]) -> dict:
    """One training run; its epoch records and wall time."""
    output = work / f"{recipe}-seed{seed}"
    argv = ["train", "--config", str(DEMO), "--data", str(data), "--output", str(output), "--seed", str(seed),
            "--eval-every", "1", "--save-every", "100", *RECIPES[recipe], *extra]
    started = time.perf_counter()
    child = CHILDREN.Process(target=_train, args=(argv,))
    child.start()
    child.join()
    wall = time.perf_counter() - started
    if child.exitcode != 0:
        sys.exit(f"{recipe} seed {seed}: `mobilenetv2 {shlex.join(argv)}` exited {child.exitcode}")
    epochs = [r for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()) if r["type"] == "epoch"]
    batch = yaml.safe_load((output / "config.yaml").read_text())["batch_size"]
    return {"epochs": epochs, "wall_s": wall, "batch": batch}


def summarise(runs: list[dict], target: float) -> dict:
    finals, trains, reached, pixels = [], [], [], []
    for run in runs:
        times = [e["time_s"] for e in run["epochs"]]
        trains.append(sum(times))
        finals.append(run["epochs"][-1]["eval_top1"])
        hit = next((i for i, e in enumerate(run["epochs"]) if e["eval_top1"] >= target), None)
        reached.append(sum(times[:hit + 1]) if hit is not None else None)
        pixels.append(sum(e["steps"] * run["batch"] * e["train_size"] ** 2 for e in run["epochs"]))
    return {"top1": finals, "train_s": trains, "reached_s": reached, "pixels": pixels}


def spread(values: list[float], form: str) -> str:
    return " / ".join(form.format(v) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--recipes", default="demo-8-epochs,demo", help=f"from {', '.join(RECIPES)}; the first is "
                        "the baseline")
    parser.add_argument("--target", type=float, default=0.91)
    parser.add_argument("--per-class", type=int, help="train images per class (default all 6,000)")
    parser.add_argument("--val-per-class", type=int, help="test images per class (default all 1,000)")
    parser.add_argument("--data", type=Path, help="the Fashion-MNIST ImageFolder (written when missing)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags for every run (a smoke run's)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = args.recipes.split(",")
    extra = [flag for flag in args.extra if flag != "--"]
    print(cpu_line(f"seeds {args.seeds}, target {args.target:.1%}"), flush=True)

    from mobilenetv2.data.fashion_mnist import write_fashion_mnist

    with tempfile.TemporaryDirectory(prefix="tta-") as work:
        work = Path(work)
        data = args.data or work / "data"
        write_fashion_mnist(data, per_class=args.per_class, val_per_class=args.val_per_class)
        runs: dict[str, list[dict]] = {recipe: [] for recipe in recipes}
        for seed in seeds:  # recipes take turns, seed by seed
            for recipe in recipes:
                run = run_once(recipe, seed, data, work, extra)
                runs[recipe].append(run)
                last = run["epochs"][-1]
                print(f"{recipe} seed {seed}: top-1 {last['eval_top1']:.2%}, training "
                      f"{sum(e['time_s'] for e in run['epochs']):.0f} s, sizes "
                      f"{[e['train_size'] for e in run['epochs']]}", flush=True)

    rows = {r: summarise(runs[r], args.target) for r in recipes}
    base = rows[recipes[0]]
    print(f"\n| recipe | final top-1 min / median / max | training s min / median / max | vs {recipes[0]} "
          f"(median) | s to reach {args.target:.0%} (median; runs that reached it) | image-pixels (median) | vs "
          f"{recipes[0]} |")
    print("|---|---|---|---|---|---|---|")
    for recipe, row in rows.items():
        reached = [s for s in row["reached_s"] if s is not None]
        reach = f"{statistics.median(reached):.0f} ({len(reached)}/{len(seeds)})" if reached else f"never (0/{len(seeds)})"
        print(f"| {recipe} | {spread([100 * t for t in row['top1']], '{:.2f} %')} | {spread(row['train_s'], '{:.0f}')} "
              f"| {statistics.median(row['train_s']) / statistics.median(base['train_s']):.2f}x | {reach} | "
              f"{statistics.median(row['pixels']):.3g} | "
              f"{statistics.median(row['pixels']) / statistics.median(base['pixels']):.2f}x |")


if __name__ == "__main__":
    main()
