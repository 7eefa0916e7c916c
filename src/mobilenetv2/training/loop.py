"""The one training loop. Modes differ only in their task (what is trainable, where batches come from); the loop
sees batches, a module and a runtime, and writes the seed's log lines, metrics and checkpoints.

Two ways out besides the end: SIGTERM (what schedulers send before preemption) writes `last.pt` at the current step
and stops with exit code 143, so `--resume auto` continues mid-epoch; a loss that is no longer finite (outside the
fp16 scaler's skipped steps) stops the run with exit code 3 before anything is saved, so the last checkpoint on disk
is the last good one. Both are checked on every rank at the same steps, so ranks agree on where they stop.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mobilenetv2.config import TrainConfig
from mobilenetv2.data.augment import BatchOps, batch_ops
from mobilenetv2.errors import TrainingStopped
from mobilenetv2.evaluation import EvalResult, with_tta
from mobilenetv2.monitor import RunMonitor, epoch_line, step_line
from mobilenetv2.runtime import Runtime
from mobilenetv2.training import run_checkpoints
from mobilenetv2.training.balance import class_weights
from mobilenetv2.training.distill import Teacher, TeacherFile
from mobilenetv2.training.recipe import build_ema, build_loss, build_optimizer, build_schedule
from mobilenetv2.training.run_checkpoints import LoopState, ResumePoint
from mobilenetv2.training.schedule import Schedule, divergence_hint
from mobilenetv2.training.tasks import TrainTask


DIVERGED_EXIT = 3
PREEMPTED_EXIT = 128 + signal.SIGTERM
STOP_CHECK_EVERY = 10  # steps between the ranks' agreement on a SIGTERM (one small collective)


class _StopRequest:
    """Set by SIGTERM while `watching()`; the loop reads it between steps."""

    requested = False

    @classmethod
    @contextlib.contextmanager
    def watching(cls):
        cls.requested = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(_signum, _frame):
            cls.requested = True

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


def train_step(trainable: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, criterion: nn.Module,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, runtime: Runtime,
               clip_grad_norm: float = 0.0) -> tuple[torch.Tensor, bool]:
    """One optimizer step, the gradients' global norm clipped to `clip_grad_norm` first when it is set; returns the
    loss and whether fp16 overflow made the scaler skip the step."""
    inputs, labels = runtime.to_input(inputs), labels.to(runtime.device, non_blocking=True)
    with runtime.autocast():
        loss = criterion(trainable(inputs), labels, inputs)
    optimizer.zero_grad(set_to_none=True)
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.scale(loss).backward()
    if clip_grad_norm:
        scaler.unscale_(optimizer)  # clip the true gradients (a no-op without a scaler)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), scale_before is not None and scaler.get_scale() < scale_before


@dataclass
class _Run:
    """What the loop holds for the whole run."""

    task: TrainTask
    config: TrainConfig
    monitor: RunMonitor
    checkpoints: Path | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: nn.Module | None
    schedule: Schedule
    criterion: nn.Module
    batch_ops: BatchOps | None
    teacher_file: TeacherFile | None = None
    announced_size: int | None = None  # the training size the log last named (none yet: the run's first epoch says it)
    skipped_images: int = 0
    skipped_steps: int = 0  # fp16 overflows
    pending: list = field(default_factory=list)  # step records whose loss is still on the device
    interval_start: float = 0.0
    first_bad: torch.Tensor | None = None  # (global step, loss) of the first non-finite loss, on the device; -1: none
    hinted_divergence: bool = False  # the "loss far above chance" hint is printed once a run
    unchecked: bool = False  # steps ran since first_bad was last read

    @property
    def evaluated(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.task.model


@dataclass
class _Epoch:
    """One epoch's running totals."""

    index: int
    losses: torch.Tensor
    steps_run: int = 0
    started: float = 0.0
    train_size: int | None = None  # the training crop's size this epoch (None: head-only, no crop)


def fit(task: TrainTask, config: TrainConfig, monitor: RunMonitor, output: Path | None,
        resume: ResumePoint | None = None, teacher: tuple[Teacher, TeacherFile] | None = None) -> LoopState:
    """The one training loop: epochs of steps, then eval, log and checkpoint at each epoch's end. `config` already
    holds what `resume` keeps from the run's start (ResumePoint.kept_options). With a `teacher` the loss is the
    distillation loss, and checkpoints record the teacher's file and hash."""
    weights = class_weights(config.class_weights, task.class_counts, task.model.class_names)
    if weights is not None:
        shown = ", ".join(f"{name} {value:.3g}" for name, value in zip(task.model.class_names, weights.tolist()))
        monitor.line(f"class weights ({config.class_weights}): {shown[:300]}")
    run = _start(task, config, monitor, output, teacher, weights)
    state = resume.restore(task.model, run.ema, run.optimizer, run.scaler) if resume else LoopState()
    if resume:
        monitor.line(f"resumed from {resume.path} at epoch {state.epoch}, step {state.global_step}")
    with _StopRequest.watching():
        _epochs(run, state)
    if run.skipped_images:
        monitor.line(f"skipped {run.skipped_images} unreadable image(s)")
    return state


def _epochs(run: _Run, state: LoopState) -> None:
    task, config, monitor = run.task, run.config, run.monitor
    while state.epoch < config.epochs and not _step_limit_reached(config, state):
        epoch = _Epoch(state.epoch, torch.zeros((), dtype=torch.float64, device=task.runtime.device),
                       started=time.perf_counter(), train_size=task.train_size(state.epoch) if task.train_size else None)
        _announce_size(run, epoch)
        done_in_epoch = state.global_step - epoch.index * task.steps_per_epoch
        task.trainable.train()
        monitor.start_epoch(task.steps_per_epoch - done_in_epoch, f"epoch {epoch.index + 1}/{config.epochs}")
        wait_start = run.interval_start = time.perf_counter()
        for step, (inputs, labels, skipped) in enumerate(task.train_batches(epoch.index, done_in_epoch), done_in_epoch):
            run.skipped_images += skipped
            # unreadable images left nothing to learn from (or one image, which BatchNorm cannot normalise at
            # small sizes): the batch's place in the schedule passes without a step, on every rank at once (a rank
            # that stepped alone would wait for the others' gradients forever)
            if task.runtime.all_true(len(labels) > 1 or (len(labels) == 1 and config.batch_size == 1)):
                _step(run, state, epoch, step, inputs, labels, wait_start)
            state.global_step += 1
            monitor.advance()
            wait_start = time.perf_counter()
            if _stop_requested(run, step):
                _preempted(run, state, epoch)
            if _step_limit_reached(config, state):
                break
        if run.pending:  # a step limit cut the interval short
            _flush(run, epoch, run.pending[-1][0]["step"])
        monitor.end_epoch()
        _end_epoch(run, state, epoch)


def _announce_size(run: _Run, epoch: _Epoch) -> None:
    """Under progressive resizing, a line when the training crop's size changes (and at the first epoch this process
    runs, resumed or not)."""
    if not run.config.progressive_resize or epoch.train_size in (None, run.announced_size):
        return
    run.announced_size = epoch.train_size
    run.monitor.line(f"training size {epoch.train_size} px from epoch {epoch.index + 1} "
                     f"(progressive {run.config.progressive_resize}, eval at {run.config.image_size} px)")


def _stop_requested(run: _Run, step: int) -> bool:
    """Whether SIGTERM arrived; under torchrun every rank answers the same, every STOP_CHECK_EVERY steps."""
    runtime = run.task.runtime
    if not runtime.distributed:
        return _StopRequest.requested
    if step % STOP_CHECK_EVERY:
        return False
    flag = torch.tensor([float(_StopRequest.requested)], device=runtime.device)
    return bool(runtime.all_reduce_sum(flag).item() > 0)


def _preempted(run: _Run, state: LoopState, epoch: _Epoch) -> None:
    """Write last.pt at this step (after checking the loss is still finite) and stop."""
    if run.pending:
        _flush(run, epoch, run.pending[-1][0]["step"])
    _check_finite(run)
    saved = _save(run, state, ["last.pt"])
    raise TrainingStopped(f"stopped by SIGTERM at step {state.global_step} (epoch {epoch.index + 1}); "
                          f"{saved or 'no checkpoint (no output folder)'} holds this step; continue with "
                          f"--resume auto", PREEMPTED_EXIT)


def _check_finite(run: _Run, read: list[float] | None = None) -> None:
    """Stop, saving nothing, if a loss since the last check was NaN or infinite. `read`: first_bad's values when the
    caller already read them back with its own; otherwise one read here, only if steps ran since the last check."""
    if not run.unchecked:
        return
    step, loss = read if read is not None else run.first_bad.tolist()
    run.unchecked = False
    if step < 0:
        return
    config = run.config
    last = run.checkpoints / "last.pt" if run.checkpoints is not None and (run.checkpoints / "last.pt").exists() else None
    raise TrainingStopped(
        f"the loss became {loss} at step {int(step)}; stopped without saving ({last or 'no checkpoint yet'} is the "
        f"last good state). Try a lower --lr-max (now {config.lr_max:g} at batch size {config.batch_size}), a "
        f"longer --warmup-epochs, or --amp off", DIVERGED_EXIT)


def _start(task: TrainTask, config: TrainConfig, monitor: RunMonitor, output: Path | None,
           teacher: tuple[Teacher, TeacherFile] | None, weights: torch.Tensor | None) -> _Run:
    return _Run(task, config, monitor, output / "checkpoints" if output else None,
                build_optimizer(task.model, config, task.runtime.device), task.runtime.grad_scaler(),
                build_ema(task.model, config), build_schedule(config, task.steps_per_epoch),
                build_loss(config, task.model.num_classes, teacher[0] if teacher else None, weights),
                batch_ops(config, task.model.num_classes), teacher_file=teacher[1] if teacher else None,
                first_bad=torch.tensor([-1.0, 0.0], dtype=torch.float64, device=task.runtime.device))


def _step_limit_reached(config: TrainConfig, state: LoopState) -> bool:
    return bool(config.max_steps) and state.global_step >= config.max_steps


def _step(run: _Run, state: LoopState, epoch: _Epoch, step: int, inputs, labels, wait_start: float) -> None:
    """One optimizer step at the schedule's rate and the EMA update. Its metrics wait on the device until the next
    log line, so a fast GPU is synchronised once per `log_every` steps, not once per step."""
    task, config = run.task, run.config
    data_wait = time.perf_counter() - wait_start
    lr = run.schedule(state.global_step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.batch_ops is not None:  # random erasing and mixup/cutmix, in the training process on every data path
        inputs, labels = run.batch_ops(task.runtime.to_input(inputs), labels.to(task.runtime.device))
    loss, overflowed = train_step(task.trainable, inputs, labels, run.criterion, run.optimizer, run.scaler, task.runtime,
                                  config.clip_grad_norm)
    run.skipped_steps += overflowed
    if not overflowed:  # the fp16 scaler skips overflowed steps on purpose
        _note_finite(run, state.global_step, loss)
    if run.ema is not None and (state.global_step + 1) % config.ema_every == 0:
        run.ema.update_parameters(task.model)
    epoch.losses += loss
    epoch.steps_run += 1
    due = step % config.log_every == 0 or step == task.steps_per_epoch - 1
    if not run.monitor.enabled:
        if due:
            _check_finite(run)
        return
    run.pending.append(({"epoch": epoch.index, "step": step, "global_step": state.global_step, "lr": lr,
                         "data_wait_s": data_wait}, loss, len(labels)))
    if due:
        _flush(run, epoch, step)


def _note_finite(run: _Run, global_step: int, loss: torch.Tensor) -> None:
    """Remember the first non-finite loss on the device (no sync, no host-to-device copy)."""
    run.unchecked = True
    bad = ~torch.isfinite(loss) & (run.first_bad[0] < 0)
    step = torch.full((), float(global_step), dtype=torch.float64, device=loss.device)  # a fill, not a copy
    run.first_bad = torch.where(bad, torch.stack([step, loss.double()]), run.first_bad)


def _flush(run: _Run, epoch: _Epoch, step: int) -> None:
    """Read the interval's losses back in one transfer, record every step, print the seed's line for this one."""
    task, config = run.task, run.config
    losses = [loss.double() for _record, loss, _count in run.pending]
    *values, epoch_total, bad_step, bad_loss = torch.cat([torch.stack([*losses, epoch.losses]),
                                                          run.first_bad]).tolist()  # the one sync
    now = time.perf_counter()
    seconds, images = now - run.interval_start, sum(count for _record, _loss, count in run.pending)
    rate = images * task.runtime.world_size / max(seconds, 1e-9)
    for (record, _loss, _count), value in zip(run.pending, values):
        run.monitor.record("step", **record, loss=value, images_per_s=rate)
    step_ms = seconds * 1000 / len(run.pending)
    run.monitor.line(step_line(epoch.index, config.epochs, step, task.steps_per_epoch, values[-1],
                               epoch_total / epoch.steps_run, step_ms, run.pending[-1][0]["lr"]))
    run.pending, run.interval_start = [], now
    _check_finite(run, [bad_step, bad_loss])
    _hint_divergence(run, max(values))


def _hint_divergence(run: _Run, loss: float) -> None:
    """Once a run (not when distilling: the teacher's term has another scale), say when the loss diverges."""
    config = run.config
    hint = None if run.hinted_divergence or run.teacher_file is not None else divergence_hint(
        loss, run.task.model.num_classes, config.batch_size, config.lr_reference_batch, config.lr_scaling, config.lr_max)
    if hint:
        run.hinted_divergence = True
        run.monitor.line(hint)


def _end_epoch(run: _Run, state: LoopState, epoch: _Epoch) -> None:
    """Count the epoch finished (unless a step limit cut it), evaluate when due, log, checkpoint."""
    task, config, runtime = run.task, run.config, run.task.runtime
    _check_finite(run)
    finished = state.global_step >= (epoch.index + 1) * task.steps_per_epoch
    if finished:
        state.epoch += 1
    seconds = time.perf_counter() - epoch.started
    totals = runtime.all_reduce_sum(torch.stack([epoch.losses, torch.tensor(float(epoch.steps_run),
                                                                            dtype=torch.float64, device=runtime.device)]))
    mean_loss = (totals[0] / totals[1].clamp(min=1)).item()
    result: EvalResult | None = None
    runtime.share_buffers(task.model, *([run.ema] if run.ema is not None else []))  # the set rank 0 saves
    if task.evaluate is not None and finished and (state.epoch % config.eval_every == 0 or state.epoch == config.epochs):
        run.evaluated.eval()
        result = task.evaluate(with_tta(run.evaluated, config.eval_tta, task.model.preprocess.image_size))
        state.best_acc = max(result.top1, state.best_acc or 0.0)
    run.monitor.line(epoch_line(seconds * 1000, seconds * 1000 / max(epoch.steps_run, 1), mean_loss,
                                result.top1 if result else None, state.best_acc if result else None))
    run.monitor.record("epoch", epoch=epoch.index, global_step=state.global_step, train_loss=mean_loss, time_s=seconds,
                       lr=run.schedule(max(state.global_step - 1, 0)), steps=epoch.steps_run,
                       eval_top1=result.top1 if result else None, eval_top5=result.top5 if result else None,
                       eval_loss=result.loss if result else None, eval_count=result.count if result else None,
                       train_size=epoch.train_size,
                       skipped_images=run.skipped_images, skipped_fp16_steps=run.skipped_steps)
    names = ["last.pt"]
    if finished and (state.epoch % config.save_every == 0 or state.epoch == config.epochs):
        names.append(run_checkpoints.numbered_name(state.epoch, task.steps_per_epoch))
    if result is not None and result.top1 >= state.best_acc:
        names.append("best.pt")
    _save(run, state, names)


def _save(run: _Run, state: LoopState, names: list[str]) -> Path | None:
    """Rank 0 writes the run's state under `names`; every rank waits for it. Returns where last.pt went."""
    if run.task.runtime.is_main and run.checkpoints is not None:
        record = run_checkpoints.payload(run.task.model, run.ema, run.optimizer, run.scaler, state, run.config,
                                         run.teacher_file)
        run_checkpoints.save(record, run.checkpoints, names, run.config.keep_max)
    run.task.runtime.barrier()
    return run.checkpoints / names[0] if run.checkpoints is not None else None
