"""Distillation on real data: a larger teacher trained here, then the demo's student without it and with it (KL and
DIST), same epochs and recipe; top-1 of each, and what the teacher's forward costs in training images/s.

Fashion-MNIST (60,000 / 10,000). The teacher is MobileNetV2 at `--teacher-width` (default 1.0: about 3x the demo's
width-0.5 multiply-adds) trained with the demo's recipe for `--teacher-epochs`; the students are the demo
(configs/fashion_mnist.yaml) as it is. The undistilled student is trained in the same run, so every row shares the
CPU, the data and the seed. Run it outside CI: about an hour on a 2-core CPU.

The cost row times training steps of the student alone and with the teacher on the same batches, in turns
(benchmarks/timing.py), and prints the ratio.

    python benchmarks/distill.py [--epochs 8] [--teacher-epochs 12] [--teacher-width 1.0] [--students plain,kl,dist]
                                 [--teacher PATH] [--json FILE]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from mobilenetv2 import runtime as runtime_module
from mobilenetv2.checkpoint import load_model
from mobilenetv2.config import TrainConfig, build_config
from mobilenetv2.data.fashion_mnist import write_fashion_mnist
from mobilenetv2.model import MobileNetV2
from mobilenetv2.training.distill import Teacher
from mobilenetv2.training.loop import train_step
from mobilenetv2.training.recipe import build_loss, build_optimizer
from mobilenetv2.training.run import run_training
from timing import best_rates, cpu_line, timing_parser

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "fashion_mnist.yaml"
STUDENTS = {"plain": {}, "kl": {"distill_loss": "kl"}, "dist": {"distill_loss": "dist"}}


def trained(name: str, overrides: dict, data: Path, epochs: int, work: Path, common: dict) -> dict:
    output = work / name
    values = {"data": str(data), "output": str(output), "epochs": epochs, "eval_every": epochs, "save_every": epochs,
              "log_every": 1000, **common, **overrides}
    started = time.perf_counter()
    run_training(build_config(TrainConfig, DEMO, values))
    seconds = time.perf_counter() - started
    epochs_seen = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in epochs_seen if r["type"] == "epoch"][-1]
    return {"run": name, "epochs": epochs, "top1": last["eval_top1"], "train_loss": last["train_loss"],
            "seconds": round(seconds, 1), "checkpoint": str(output / "checkpoints" / "last.pt"), **overrides}


def teacher_cost(teacher_path: str, seconds: float, rounds: int, common: dict) -> tuple[float, float]:
    """Images/s of the demo student's training step alone, and with the teacher's forward, at the demo's batch."""
    config = build_config(TrainConfig, DEMO, {"data": ".", **common})
    teacher_model = load_model(teacher_path)
    state = runtime_module.setup("cpu", "off", channels_last=True)
    size = config.image_size
    images = torch.randn(config.batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (config.batch_size,))
    steps = {}
    for name, teacher in (("student", None), ("student+teacher", teacher_model)):
        torch.manual_seed(0)
        student = state.prepare_model(MobileNetV2(num_classes=10, width_mult=config.width_mult))
        wrapped = None if teacher is None else state.prepare_model(Teacher(teacher, (0.5,) * 3, (0.5,) * 3,
                                                                           (0.5,) * 3, (0.5,) * 3, None))
        criterion = build_loss(config, 10, wrapped)
        optimizer = build_optimizer(student, config)
        scaler = state.grad_scaler()

        def step(student=student, criterion=criterion, optimizer=optimizer, scaler=scaler):
            train_step(student, images, labels, criterion, optimizer, scaler, state)

        steps[name] = step
    rates = best_rates(steps, config.batch_size, seconds, rounds)
    return rates["student"], rates["student+teacher"]


def main() -> None:
    parser = timing_parser(__doc__.splitlines()[0], seconds=3.0)
    parser.add_argument("--epochs", type=int, default=8, help="the students' epochs (the demo's 8)")
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--teacher-width", type=float, default=1.0)
    parser.add_argument("--teacher", default="", help="a trained teacher to reuse instead of training one")
    parser.add_argument("--students", default="plain,kl,dist")
    parser.add_argument("--data", default="data/fashion-mnist")
    parser.add_argument("--json", default="")
    parser.add_argument("--per-class", type=int, help="train images per class (default: all 6,000)")
    parser.add_argument("--val-per-class", type=int, help="test images per class (default: all 1,000)")
    parser.add_argument("--image-size", type=int, help="train and eval size (default: the demo's)")
    args = parser.parse_args()
    common = {"image_size": args.image_size, "resize_size": args.image_size} if args.image_size else {}
    print(cpu_line(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        data = Path(args.data)
        if args.per_class or args.val_per_class:
            data = data.with_name(f"{data.name}-{args.per_class}-{args.val_per_class}")
        data = write_fashion_mnist(data, per_class=args.per_class, val_per_class=args.val_per_class)
        teacher = args.teacher
        if not teacher:
            row = trained("teacher", {"width_mult": args.teacher_width}, data, args.teacher_epochs, work, common)
            rows.append(row)
            teacher = row["checkpoint"]
            print(f"| teacher (width {args.teacher_width}, {args.teacher_epochs} epochs) | {100 * row['top1']:.2f} % "
                  f"| {row['seconds']:.0f} s |", flush=True)
        for name in [n for n in args.students.split(",") if n]:
            overrides = {**STUDENTS[name], **({"teacher": teacher} if name != "plain" else {})}
            row = trained(f"student-{name}", overrides, data, args.epochs, work, common)
            rows.append(row)
            print(f"| student {name} ({args.epochs} epochs) | {100 * row['top1']:.2f} % | {row['seconds']:.0f} s |",
                  flush=True)
        alone, taught = teacher_cost(teacher, args.seconds, args.rounds, common)
        rows.append({"run": "cost", "student_images_per_s": alone, "with_teacher_images_per_s": taught})
        print(f"training images/s: student {alone:.0f}, with the teacher's forward {taught:.0f} "
              f"({taught / alone:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
