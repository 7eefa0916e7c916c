"""The main job, end to end on real data: Fashion-MNIST from scratch, evaluate, export ONNX (checked with
onnxruntime), predict a few test images, and write runs/demo/report.md with curves.png.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import random
import shutil
import time
from pathlib import Path

import torch

from mobilenetv2 import runtime
from mobilenetv2.checkpoint import load_model
from mobilenetv2.config import TrainConfig, build_config
from mobilenetv2.data.fashion_mnist import write_fashion_mnist
from mobilenetv2.deploy import predict
from mobilenetv2.deploy.export import export
from mobilenetv2.monitor import plot_run
from mobilenetv2.training.run import run_training

# a smoke run at one size (the full recipe's progressive schedule is for its own image size and epochs)
QUICK = {"epochs": 6, "image_size": 32, "resize_size": 32, "width_mult": 0.35, "batch_size": 50, "lr_max": 0.05,
         "warmup_epochs": 0.5, "eval_every": 2, "save_every": 6, "ema": 0.0, "progressive_resize": "",
         "progressive_ramp": ""}


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    output: Path = Path("runs/demo")
    config: Path = Path("configs/fashion_mnist.yaml")
    data: Path = Path("data/fashion-mnist")
    quick: bool = False
    per_class: int | None = None  # train images per class (None: all 6,000)
    val_per_class: int | None = None  # test images per class (None: all 1,000)
    device: str = "auto"


def run_demo(options: DemoOptions) -> dict:
    started = time.perf_counter()
    data_dir = options.data
    if options.per_class or options.val_per_class:
        data_dir = data_dir.with_name(f"{data_dir.name}-{options.per_class}-{options.val_per_class}")
    write_fashion_mnist(data_dir, per_class=options.per_class, val_per_class=options.val_per_class)
    prepared = time.perf_counter()
    overrides = {"data": str(data_dir), "output": str(options.output), "device": options.device}
    if options.quick:
        overrides.update(QUICK)
    config = build_config(TrainConfig, options.config, overrides)
    if options.output.exists():
        shutil.rmtree(options.output)  # a demo run starts clean; its data folder is reused
    run_training(config)
    trained = time.perf_counter()
    checkpoint = options.output / "checkpoints" / "last.pt"
    evaluation = _evaluate(checkpoint, data_dir, options, config.eval_tta)
    onnx_report = _export(checkpoint, options.output / "model.onnx")
    onnx_eval = _evaluate(options.output / "model.onnx", data_dir, options, config.eval_tta, device="cpu")
    predictions = _predict(checkpoint, data_dir)
    curves = plot_run(options.output)
    finished = time.perf_counter()
    summary = {
        "top1": evaluation["top1"], "top5": evaluation["top5"], "count": evaluation["count"],
        "onnx_top1": onnx_eval["top1"], "onnx_check": onnx_report,
        "seconds": {"data": prepared - started, "train": trained - prepared, "total": finished - started},
        "device": str(runtime.resolve_device(options.device)), "config": config.to_dict(), "per_class_accuracy": evaluation["per_class_accuracy"],
        "predictions": predictions, "curves": str(curves),
    }
    (options.output / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_report(options.output / "report.md", summary, options)
    return summary


def _evaluate(checkpoint: Path, data_dir: Path, options: DemoOptions, tta: str, device: str | None = None) -> dict:
    """Top-1 and the rest of `checkpoint` as written: a .pt in PyTorch (the export is measured on its own), with
    the recipe's test-time augmentation."""
    with runtime.session(device or options.device, "off") as state:
        engine = "onnx" if checkpoint.suffix == ".onnx" else "torch"
        result, classes, _ = predict.evaluate_checkpoint(checkpoint, data_dir / "val", state, batch_size=500,
                                                         runtime_name=engine, tta=tta)
    return result.to_dict(classes)


def _export(checkpoint: Path, output: Path) -> list[str]:
    """The exporter that takes a second rather than ten (the demo has a time budget; the file is as good: checked the
    same way, and as fast in ONNX Runtime)."""
    return export(load_model(checkpoint), "onnx", output, dynamic_batch=True, onnx_exporter="auto")


def _predict(checkpoint: Path, data_dir: Path, count: int = 6) -> list[dict]:
    files = sorted((data_dir / "val").glob("*/*.png"))
    chosen = random.Random(0).sample(files, min(count, len(files)))
    results = predict.predict(predict.load_classifier(checkpoint), chosen, topk=3)
    for result, path in zip(results, chosen):
        result["true"] = path.parent.name
    return results


def _write_report(path: Path, summary: dict, options: DemoOptions) -> None:
    config = summary["config"]
    seconds = summary["seconds"]
    lines = [
        "# Fashion-MNIST demo",
        "",
        f"MobileNetV2 (width {config['width_mult']}, {config['image_size']} px) trained from scratch for "
        f"{config['epochs']} epochs on {platform.machine()} with {torch.get_num_threads()} threads "
        f"(device {summary['device']}).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| top-1 on {summary['count']} test images{' (flip TTA)' if config['eval_tta'] == 'flip' else ''} | "
        f"**{summary['top1']:.2%}** |",
        f"| top-5 | {summary['top5']:.2%} |",
        f"| top-1 of the exported ONNX model (onnxruntime) | {summary['onnx_top1']:.2%} |",
        f"| data preparation | {seconds['data']:.0f} s |",
        f"| training (incl. per-epoch eval and checkpoints) | {seconds['train']:.0f} s |",
        f"| whole demo | {seconds['total']:.0f} s |",
        "",
        "ONNX check: " + "; ".join(summary["onnx_check"]),
        "",
        "![curves](curves.png)",
        "",
        "## Per-class accuracy",
        "",
        "| class | accuracy |",
        "|---|---|",
        *[f"| {name} | {value:.2%} |" for name, value in summary["per_class_accuracy"].items() if value is not None],
        "",
        "## Predictions on test images",
        "",
        "| image | true class | top-3 |",
        "|---|---|---|",
        *[f"| {Path(p['image']).name} | {p['true']} | " + ", ".join(
            f"{q['class']} {q['probability']:.1%}" for q in p["predictions"]) + " |" for p in summary["predictions"]],
        "",
        "## Recipe",
        "",
        "```yaml",
        *[f"{key}: {value}" for key, value in config.items() if key not in ("data", "output")],
        "```",
        "",
        f"Reproduce: `make demo{'-quick' if options.quick else ''}`",
        "",
    ]
    path.write_text("\n".join(lines))


