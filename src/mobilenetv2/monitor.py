"""What a run reports: the seed's log lines, a progress bar, metrics.jsonl, TensorBoard, and plots of a run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mobilenetv2.errors import UserError


def step_line(epoch: int, epochs: int, step: int, steps: int, loss: float, mean_loss: float, step_ms: float,
              lr: float) -> str:
    """The seed's per-step line (epoch and step 0-based, time in milliseconds)."""
    return (f"epoch: [{epoch:3d}/{epochs:3d}], step:[{step:5d}/{steps:5d}], loss:[{loss:5.3f}/{mean_loss:5.3f}], "
            f"time:[{step_ms:5.3f}], lr:[{lr:5.3f}]")


def epoch_line(epoch_ms: float, step_ms: float, mean_loss: float, eval_acc: float | None = None,
               best_acc: float | None = None) -> str:
    line = f"epoch time: {epoch_ms:5.3f}, per step time: {step_ms:5.3f}, avg loss: {mean_loss:5.3f}"
    if eval_acc is not None:
        line += f", eval_acc: {eval_acc:.4f}, best_acc: {best_acc:.4f}"
    return line


class RunMonitor:
    """Writes only on the main process; other ranks get a silent monitor."""

    def __init__(self, output: Path | None, *, enabled: bool, tensorboard: bool = False, progress: bool | None = None):
        self.enabled = enabled and output is not None
        self.progress_enabled = enabled and (sys.stdout.isatty() if progress is None else progress)
        self._log = self._metrics = self._writer = self._bar = None
        if not self.enabled:
            return
        output.mkdir(parents=True, exist_ok=True)
        self._log = (output / "train.log").open("a", buffering=1)
        self._metrics = (output / "metrics.jsonl").open("a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("`tensorboard` needs the tensorboard package: pip install tensorboard") from None
            self._writer = SummaryWriter(str(output / "tensorboard"))

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)
        self._log.write(text + "\n")

    def record(self, kind: str, **values: Any) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps({"type": kind, **values}) + "\n")
        if self._writer is not None:
            step = values.get("global_step", values.get("epoch", 0))
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step", "global_step"):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)

    def start_epoch(self, total: int, description: str) -> None:
        if self.progress_enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)

    def advance(self, loss: float | None = None) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.3f}")

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.end_epoch()
        for handle in (self._log, self._metrics, self._writer):
            if handle is not None:
                handle.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics.jsonl in {run_dir} (is it a training run folder?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}:{number} is not a JSON record") from None
    return records


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Train loss, eval accuracy and learning rate per epoch, drawn from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r for r in read_metrics(run_dir) if r.get("type") == "epoch"]
    if not epochs:
        raise UserError(f"{run_dir}/metrics.jsonl has no finished epoch to plot")
    x = [r["epoch"] + 1 for r in epochs]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(x, [r["train_loss"] for r in epochs], marker="o")
    axes[0].set(title="train loss", xlabel="epoch")
    evaluated = [(e, r) for e, r in zip(x, epochs) if r.get("eval_top1") is not None]
    if evaluated:
        axes[1].plot([e for e, _ in evaluated], [100 * r["eval_top1"] for _, r in evaluated], marker="o", label="top-1")
        axes[1].plot([e for e, _ in evaluated], [100 * r["eval_top5"] for _, r in evaluated], marker=".", label="top-5")
        axes[1].legend()
    axes[1].set(title="eval accuracy (%)", xlabel="epoch")
    steps = [r for r in read_metrics(run_dir) if r.get("type") == "step"]
    if steps:
        per_epoch = max(1, max(r["step"] for r in steps) + 1)
        axes[2].plot([r["global_step"] / per_epoch for r in steps], [r["lr"] for r in steps])
    else:
        axes[2].plot(x, [r["lr"] for r in epochs], marker="o")
    axes[2].set(title="learning rate", xlabel="epoch")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    output = Path(output) if output else Path(run_dir) / "curves.png"
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output
