"""`run_training`: check everything, build the mode's network and task, run the loop. Nothing is written on bad
input, and the caller's global random state is the same afterwards as before."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import torch

from mobilenetv2 import runtime as runtime_module
from mobilenetv2.checkpoint import read_weights
from mobilenetv2.config import TrainConfig, write_yaml
from mobilenetv2.data.folders import find_splits
from mobilenetv2.data.shard_source import ShardSplits, find_shard_splits, is_shard_source
from mobilenetv2.monitor import RunMonitor
from mobilenetv2.runtime import Runtime
from mobilenetv2.training.distill import load_teacher
from mobilenetv2.training.loop import fit
from mobilenetv2.training.run_checkpoints import LoopState, ResumePoint, resume_path
from mobilenetv2.training.schedule import lr_note
from mobilenetv2.training.setup import build_model, resolve_config
from mobilenetv2.training.shard_task import check_shard_run, shard_task
from mobilenetv2.training.tasks import build_task


def run_training(config: TrainConfig) -> LoopState:
    """Train as `config` says; returns where the loop stopped (epochs finished, steps, best accuracy)."""
    splits = find_shard_splits(config.data, config.shard_info) if is_shard_source(config.data) else find_splits(config.data)
    loaded = read_weights(config.pretrained) if config.pretrained else None
    config = resolve_config(config, loaded)
    if isinstance(splits, ShardSplits):
        check_shard_run(config, splits)
    with runtime_module.preserved_rng():
        runtime_module.seed_everything(config.seed)  # the same initial weights on every rank and every run
        setup = build_model(config, splits.classes, loaded)
        with runtime_module.session(config.device, config.amp, config.channels_last, config.compile,
                                    config.dist_timeout) as runtime:
            output = _output_folder(config, runtime)
            resume_from = resume_path(config, output)
            resume = ResumePoint.read(resume_from) if resume_from else None
            config, resume_notes = resume.kept_options(config) if resume else (config, [])
            runtime_module.seed_everything(config.seed + runtime.rank)  # augmentation differs across ranks
            model = runtime.prepare_model(setup.model)
            amp_note = None
            if config.freeze == "none":  # head-only training runs on cached features: nothing worth timing
                runtime, amp_note = runtime_module.tune_cpu_amp(runtime, config.amp, model, config.batch_size,
                                                                config.train_sizes[1],
                                                                model.num_classes)
            teacher = load_teacher(config, model, runtime)
            if resume:
                resume.check_teacher(teacher[1] if teacher else None)
            task = _task(config, model, splits, runtime, output, teacher)
            if task is None:  # this rank helped extract features; the head trains on rank 0
                return LoopState()
            if teacher and task.teacher is not None:  # head-only: the teacher's logits come cached with the features
                teacher = (task.teacher, teacher[1])
            monitor = RunMonitor(output, enabled=task.runtime.is_main, tensorboard=config.tensorboard)
            try:
                if task.runtime.is_main:
                    write_yaml(config.to_dict(), output / "config.yaml")
                _announce(monitor, config, [*setup.notes, *task.notes, _lr_note(config), *resume_notes, amp_note], task,
                          teacher)
                return fit(task, config, monitor, output, resume, teacher)
            finally:
                monitor.close()


def _task(config: TrainConfig, model, splits, runtime: Runtime, output: Path, teacher):
    """The mode's task; shards (ShardSplits) stream through the shard task."""
    if isinstance(splits, ShardSplits):
        return shard_task(config, model, splits, runtime, output)
    return build_task(config, model, splits, runtime, output, teacher)


def _lr_note(config: TrainConfig) -> str | None:
    return lr_note(config.batch_size, config.lr_reference_batch, config.lr_scaling, config.lr_max)


def _announce(monitor: RunMonitor, config: TrainConfig, notes: list[str | None], task, teacher) -> None:
    """The run's opening lines: how it was set up, where it runs, what teaches it."""
    for note in notes:
        if note:
            monitor.line(note)
    monitor.line(f"device {task.runtime.device}, world size {task.runtime.world_size}, amp "
                 f"{task.runtime.amp_dtype or 'off'}, {task.steps_per_epoch} steps per epoch")
    if teacher:
        monitor.line(f"distilling from {teacher[1].path} ({config.teacher_arch or 'mobilenetv2'}, sha256 "
                     f"{teacher[1].sha256[:12]}): {config.distill_loss} loss")


def _output_folder(config: TrainConfig, runtime: Runtime) -> Path:
    name = config.output or f"runs/{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if runtime.distributed:  # every rank must agree on rank 0's clock
        holder = [name]
        torch.distributed.broadcast_object_list(holder, src=0)
        name = holder[0]
    return Path(name)
