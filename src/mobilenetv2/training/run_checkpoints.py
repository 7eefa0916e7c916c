"""A run's checkpoints: the full training state as plain data (model, EMA, optimizer, scaler, position, RNG),
written once and renamed into every name it goes by, keep-max pruning, and restoring it to resume."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from mobilenetv2 import runtime as runtime_module
from mobilenetv2.checkpoint import cpu_state, read_torch_file, torch_bytes
from mobilenetv2.config import WEIGHT_DECAY_SETS, TrainConfig, upgrade_legacy_options
from mobilenetv2.errors import CheckpointError, UserError, first_line
from mobilenetv2.files import atomic_write_bytes, remove_stale_temps
from mobilenetv2.model import MobileNetV2
from mobilenetv2.training.distill import TeacherFile

# options a distilled run keeps from its start on resume (its loss; the teacher's path when none is given)
DISTILLATION_OPTIONS = ("teacher", "teacher_arch", "distill_loss", "distill_temperature", "distill_weight",
                        "task_loss_weight")
NUMBERED = re.compile(r"^mobilenetv2-(\d+)_(\d+)\.pt$")


@dataclass
class LoopState:
    epoch: int = 0  # epochs finished
    global_step: int = 0
    best_acc: float | None = None


def numbered_name(epoch: int, steps_per_epoch: int) -> str:
    """The seed's checkpoint name."""
    return f"mobilenetv2-{epoch}_{steps_per_epoch}.pt"


def payload(model: MobileNetV2, ema, optimizer, scaler, state: LoopState, config: TrainConfig,
            teacher: TeacherFile | None = None) -> dict:
    """Everything a resume needs. `model` holds the EMA weights when there is an EMA (what eval and export use);
    `train_model` then holds the raw weights the optimizer steps on. A teacher is named, not saved."""
    evaluated = ema.module if ema is not None else model
    record = model.metadata()
    record.update(model=cpu_state(evaluated), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                  epoch=state.epoch, global_step=state.global_step, best_acc=state.best_acc,
                  rng=runtime_module.rng_state(), train_config=config.to_dict())
    if teacher is not None:
        record["teacher"] = teacher.to_dict()
    if ema is not None:
        record["train_model"] = cpu_state(model)
        record["ema_averaged"] = ema.n_averaged.cpu()
    return record


def save(record: dict, folder: Path, names: list[str], keep_max: int) -> None:
    """Serialise once, write every name atomically, then prune numbered checkpoints beyond keep_max (and the temp
    files of a run that was killed mid-write)."""
    remove_stale_temps(folder)
    data = torch_bytes(record)
    for name in names:
        atomic_write_bytes(folder / name, data)
    numbered = sorted((p for p in folder.iterdir() if NUMBERED.match(p.name)),
                      key=lambda p: tuple(int(x) for x in NUMBERED.match(p.name).groups()))
    for old in numbered[:-keep_max]:
        old.unlink(missing_ok=True)


@dataclass
class ResumePoint:
    """A training checkpoint to continue from, read once."""

    path: Path
    record: dict

    @classmethod
    def read(cls, path: Path) -> ResumePoint:
        record = read_torch_file(path)
        if not isinstance(record, dict) or "optimizer" not in record or "global_step" not in record:
            raise CheckpointError(f"{path} is not a training checkpoint (no optimizer state); use it as `pretrained`")
        return cls(path, record)

    def kept_options(self, config: TrainConfig) -> tuple[TrainConfig, list[str]]:
        """`config` with the options a resumed run keeps from its start whatever it now says, and a line for each
        that differs: the weight-decay set (the optimizer state is laid out by it). A checkpoint from before
        `weight_decay_on` existed is read in today's terms; one that names neither option decayed every parameter."""
        saved = self.record.get("train_config")
        saved, notes = upgrade_legacy_options(saved if isinstance(saved, dict) else {}, str(self.path))
        started = saved.get("weight_decay_on", "all")
        if started not in WEIGHT_DECAY_SETS:
            raise CheckpointError(f"{self.path}: unknown weight_decay_on {started!r} in its train_config")
        if started != config.weight_decay_on:
            notes.append(f"resuming with weight_decay_on {started}, the set the run was started with (the options "
                         f"now say {config.weight_decay_on})")
            config = dataclasses.replace(config, weight_decay_on=started)
        if "teacher" in self.record:  # the loss a distilled run started with, whatever the options now say
            kept = {name: saved[name] for name in DISTILLATION_OPTIONS if name in saved}
            if config.teacher:  # the file may have moved; check_teacher compares its contents
                kept.pop("teacher", None)
            changed = [name for name, value in kept.items() if getattr(config, name) != value]
            if changed:
                notes.append(f"resuming with the distillation the run was started with ({', '.join(changed)} as "
                             f"{self.path} records)")
                config = dataclasses.replace(config, **kept)
        return config, notes

    def check_teacher(self, teacher: TeacherFile | None) -> None:
        """Refuse to continue a distilled run with a teacher file other than the one it started with."""
        started = self.record.get("teacher")
        if isinstance(started, dict) and (teacher is None or started.get("sha256") != teacher.sha256):
            now = f"{teacher.path} has sha256 {teacher.sha256[:12]}" if teacher else "there is no teacher now"
            raise UserError(f"{self.path} was distilled from {started.get('path')} (sha256 "
                            f"{str(started.get('sha256'))[:12]}); {now}: give the same teacher file to resume")

    def restore(self, model: nn.Module, ema, optimizer, scaler) -> LoopState:
        """Load the checkpoint into the run's objects (RNG states too) and return where it stopped."""
        record, path = self.record, self.path
        weights = record.get("train_model") or record["model"]
        try:
            model.load_state_dict(weights)
            optimizer.load_state_dict(record["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path} does not fit this run's network or options: {first_line(exc)}") from None
        scaler.load_state_dict(record["scaler"])
        if ema is not None:
            if "train_model" in record:
                ema.module.load_state_dict(record["model"])
                ema.n_averaged.copy_(record["ema_averaged"])
            else:
                ema.module.load_state_dict(weights)
        runtime_module.set_rng_state(record["rng"])
        return LoopState(record["epoch"], record["global_step"], record.get("best_acc"))


def resume_path(config: TrainConfig, output: Path) -> Path | None:
    """The checkpoint `resume` names: a path, or 'auto' for OUTPUT/checkpoints/last.pt (None when there is none yet).
    A worker that torchrun restarted (`--max-restarts`) resumes as 'auto' by itself."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    if not config.resume and not (restarted and config.output):
        return None
    if config.resume in ("auto", ""):
        if not config.output:
            raise UserError("`resume` auto needs `output` (the run folder to continue)")
        last = output / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    path = Path(config.resume)
    if not path.is_file():
        raise UserError(f"`resume` checkpoint not found: {path}")
    return path
