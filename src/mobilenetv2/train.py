"""One training loop for every mode (scratch, full fine-tune, incremental, class-incremental, head-only), and
`evaluate`. Modes differ only in what is loaded and what is trainable; the loop sees batches and a module.
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from mobilenetv2 import data as data_module
from mobilenetv2 import runtime as runtime_module
from mobilenetv2.checkpoint import (LoadedWeights, atomic_write_bytes, channel_plan, load_state_into, model_metadata,
                                    read_weights)
from mobilenetv2.config import TrainConfig, write_yaml
from mobilenetv2.errors import CheckpointError, UserError
from mobilenetv2.model import MobileNetV2
from mobilenetv2.monitor import RunMonitor, epoch_line, step_line
from mobilenetv2.runtime import Runtime
from mobilenetv2.schedule import SeedSchedule


# ---------------------------------------------------------------- loss and evaluation

class SeedLabelSmoothingLoss(nn.Module):
    """The seed's loss: one-hot targets with on = 1 - eps, off = eps / (K - 1), softmax cross-entropy, mean."""

    def __init__(self, smoothing: float):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        classes = logits.shape[1]
        log_probs = F.log_softmax(logits.float(), dim=1)
        off = self.smoothing / (classes - 1) if classes > 1 else 0.0
        target = torch.full_like(log_probs, off).scatter_(1, labels[:, None], 1.0 - self.smoothing)
        return -(target * log_probs).sum(dim=1).mean()


@dataclass
class EvalResult:
    count: int
    top1: float
    top5: float
    loss: float
    skipped: int
    confusion: torch.Tensor  # [true, predicted]

    def per_class_accuracy(self) -> list[float | None]:
        totals = self.confusion.sum(dim=1)
        return [float(self.confusion[i, i] / totals[i]) if totals[i] else None for i in range(len(totals))]

    def to_dict(self, class_names: list[str] | None = None) -> dict:
        names = class_names or [str(i) for i in range(len(self.confusion))]
        return {"count": self.count, "top1": self.top1, "top5": self.top5, "loss": self.loss, "skipped": self.skipped,
                "per_class_accuracy": dict(zip(names, self.per_class_accuracy())),
                "confusion_matrix": self.confusion.tolist(), "class_names": names}


@torch.no_grad()
def evaluate(model_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, runtime: Runtime,
             num_classes: int) -> EvalResult:
    """Counts every item of `batches` (this rank's shard) once, then sums the counts over all ranks."""
    sums = torch.zeros(5, dtype=torch.float64, device=runtime.device)  # correct1, correct5, loss, count, skipped
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=runtime.device)
    for inputs, labels, skipped in batches:
        sums[4] += skipped
        if len(labels) == 0:
            continue
        labels = labels.to(runtime.device)
        with runtime.autocast():
            logits = model_fn(runtime.to_input(inputs)).float()
        top = logits.topk(min(5, num_classes), dim=1).indices
        sums[0] += (top[:, 0] == labels).sum()
        sums[1] += (top == labels[:, None]).any(dim=1).sum()
        sums[2] += F.cross_entropy(logits, labels, reduction="sum")
        sums[3] += len(labels)
        confusion.index_put_((labels, top[:, 0]), torch.ones_like(labels, dtype=torch.float64), accumulate=True)
    runtime.all_reduce_sum(sums)
    runtime.all_reduce_sum(confusion)
    count = int(sums[3].item())
    denominator = max(count, 1)
    return EvalResult(count, sums[0].item() / denominator, sums[1].item() / denominator, sums[2].item() / denominator,
                      int(sums[4].item()), confusion.cpu().long())


# ---------------------------------------------------------------- model and optimizer

@dataclass
class ModelSetup:
    model: MobileNetV2
    class_names: list[str]
    notes: list[str] = field(default_factory=list)


def _check_width(config: TrainConfig, loaded: LoadedWeights) -> None:
    if channel_plan(config.width_mult) != channel_plan(loaded.width_mult):
        raise UserError(f"--pretrained {config.pretrained} has width {loaded.width_mult} but --width-mult is "
                        f"{config.width_mult}; pass --width-mult {loaded.width_mult}")


def build_model(config: TrainConfig, classes: list[str], loaded: LoadedWeights | None) -> ModelSetup:
    """The network for this mode, with whatever the mode takes from the pretrained checkpoint."""
    num_classes = config.num_classes or len(classes)
    if num_classes < len(classes):
        raise UserError(f"--num-classes {num_classes} is smaller than the {len(classes)} class folders")
    class_names = classes + [f"class_{i}" for i in range(len(classes), num_classes)]
    model = MobileNetV2(num_classes=num_classes, width_mult=config.width_mult, dropout=config.dropout)
    if loaded is None:
        return ModelSetup(model, class_names, ["training from scratch"])
    _check_width(config, loaded)
    if config.extend_classes:
        return _extend_classes(model, class_names, loaded, config)
    head_fits = loaded.num_classes == num_classes and loaded.class_names in (None, class_names)
    if config.filter_head or (config.freeze == "backbone" and not head_fits):
        load_state_into(model, loaded, skip_head=True)
        return ModelSetup(model, class_names, [f"loaded the backbone of {config.pretrained}; new {num_classes}-class head"])
    if not head_fits:
        have = f"{loaded.num_classes} classes" + (f" ({', '.join(loaded.class_names[:4])}, ...)" if loaded.class_names else "")
        raise UserError(f"--pretrained head has {have}, the data has {num_classes} ({', '.join(class_names[:4])}, ...): "
                        "pass --filter-head for a new head or --extend-classes to add classes")
    load_state_into(model, loaded)
    return ModelSetup(model, class_names, [f"continuing from all of {config.pretrained} (head included)"])


def _extend_classes(model: MobileNetV2, class_names: list[str], loaded: LoadedWeights, config: TrainConfig) -> ModelSetup:
    """Class-incremental: the checkpoint's head rows move to their classes' new positions; new rows are fresh."""
    old_names = loaded.class_names
    if not old_names:
        raise UserError(f"--extend-classes needs class names in the checkpoint; {config.pretrained} has none "
                        "(convert it with --class-names FILE)")
    missing = [name for name in old_names if name not in class_names]
    if missing:
        raise UserError(f"--extend-classes: the training folder lacks the checkpoint's classes {', '.join(missing[:5])}")
    load_state_into(model, loaded, skip_head=True)
    weight, bias = loaded.state_dict["head.classifier.weight"], loaded.state_dict["head.classifier.bias"]
    with torch.no_grad():
        for old_index, name in enumerate(old_names):
            new_index = class_names.index(name)
            model.head.classifier.weight[new_index] = weight[old_index]
            model.head.classifier.bias[new_index] = bias[old_index]
    added = [name for name in class_names if name not in old_names]
    return ModelSetup(model, class_names, [f"extended {len(old_names)} classes with {len(added)} new: {', '.join(added[:5])}"])


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """Momentum SGD; with decay_bn_bias off, BatchNorm parameters and biases get no weight decay (the seed's Ascend path)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 and not config.decay_bn_bias else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=config.lr_init, momentum=config.momentum)


# ---------------------------------------------------------------- what the loop trains

@dataclass
class TrainTask:
    """The loop's inputs: a module mapping batch inputs to logits, batches per epoch, and an eval function."""

    trainable: nn.Module
    model: MobileNetV2  # the full network that checkpoints hold
    train_batches: Callable[[int, int], Iterable]  # (epoch, batches to skip) -> (inputs, labels, skipped)
    steps_per_epoch: int
    evaluate: Callable[[nn.Module], EvalResult] | None  # full network (or its EMA) -> metrics on val
    notes: list[str] = field(default_factory=list)


class _SkipSampler(Sampler[int]):
    """Drops the first `skip` indices of a sampler's order (resuming mid-epoch)."""

    def __init__(self, sampler: Sampler[int], skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        iterator = iter(self.sampler)
        for _ in range(self.skip):
            next(iterator, None)
        return iterator

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


def _train_sampler(length: int, config: TrainConfig, runtime: Runtime) -> tuple[DistributedSampler, bool, int]:
    """This rank's shuffled share of `length` items, whether to drop the remainder, and the steps per epoch.

    The seed drops the remainder; a set smaller than one batch keeps its single batch.
    """
    sampler = DistributedSampler(range(length), num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True,
                                 seed=config.seed, drop_last=False)
    drop_last = len(sampler) >= config.batch_size
    return sampler, drop_last, len(sampler) // config.batch_size if drop_last else 1


def image_task(config: TrainConfig, model: MobileNetV2, splits, class_names, runtime: Runtime) -> TrainTask:
    """Train the whole network (or what requires grad) on images through a DataLoader."""
    preprocess = config.preprocess
    train_set = data_module.image_folder(splits.train, data_module.train_transform(
        preprocess, config.min_scale, config.color_jitter), class_names[: len(splits.classes)])
    sampler, drop_last, steps = _train_sampler(len(train_set), config, runtime)
    pin = runtime.device.type == "cuda"

    def batches(epoch: int, skip: int):
        sampler.set_epoch(epoch)
        loader = DataLoader(train_set, batch_size=config.batch_size, sampler=_SkipSampler(sampler, skip * config.batch_size),
                            num_workers=config.workers, collate_fn=data_module.collate_skipping, pin_memory=pin,
                            drop_last=drop_last, persistent_workers=False)
        return loader

    trainable = runtime.wrap_distributed(model)
    evaluate_fn = None
    if splits.val is not None and config.eval_every:
        val_set = data_module.image_folder(splits.val, data_module.eval_transform(preprocess), class_names[: len(splits.classes)])
        val_loader = data_module.eval_loader(val_set, config.batch_size, config.workers, runtime.rank,
                                             runtime.world_size, pin)

        def evaluate_fn(network: nn.Module) -> EvalResult:
            return evaluate(network, val_loader, runtime, model.num_classes)

    return TrainTask(trainable, model, batches, steps, evaluate_fn)


def memory_task(config: TrainConfig, model: MobileNetV2, splits, class_names, runtime: Runtime) -> TrainTask:
    """Train on a dataset decoded once into memory, augmenting whole batches (no per-image DataLoader work)."""
    preprocess = config.preprocess
    known = class_names[: len(splits.classes)]
    images, labels, skipped = data_module.decode_all(
        data_module.image_folder(splits.train, None, known), preprocess.resize_size, config.workers)
    augment = data_module.BatchAugment(preprocess, config.min_scale, config.color_jitter)
    sampler, drop_last, steps = _train_sampler(len(labels), config, runtime)

    def batches(epoch: int, skip: int):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        for start in range(skip * config.batch_size, steps * config.batch_size if drop_last else len(order),
                           config.batch_size):
            index = order[start:start + config.batch_size]
            yield augment(images[index]), labels[index], skipped if start == 0 else 0

    trainable = runtime.wrap_distributed(model)
    evaluate_fn = None
    if splits.val is not None and config.eval_every:
        val_set = data_module.image_folder(splits.val, data_module.eval_transform(preprocess), known)
        val_images, val_labels, val_skipped = data_module.collect_tensors(val_set, config.workers)
        shard = torch.arange(runtime.rank, len(val_labels), runtime.world_size)

        def evaluate_fn(network: nn.Module) -> EvalResult:
            chunks = ((val_images[i], val_labels[i], 0) for i in shard.split(max(config.batch_size, 256)))
            result = evaluate(network, chunks, runtime, model.num_classes)
            result.skipped += val_skipped
            return result

    return TrainTask(trainable, model, batches, steps, evaluate_fn,
                     notes=[f"{len(labels)} training images decoded into memory at {preprocess.resize_size} px"])


# ---------------------------------------------------------------- checkpoints

CHECKPOINT_PATTERN = re.compile(r"^mobilenetv2-(\d+)_(\d+)\.pt$")


@dataclass
class LoopState:
    epoch: int = 0  # epochs finished
    global_step: int = 0
    best_acc: float | None = None


def _checkpoint_payload(task: TrainTask, ema, optimizer, scaler, state: LoopState, class_names, preprocess,
                        config: TrainConfig) -> dict:
    evaluated = ema.module if ema is not None else task.model
    payload = model_metadata(task.model, class_names, preprocess)
    payload.update(
        model={k: v.detach().cpu() for k, v in evaluated.state_dict().items()},
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(),
        epoch=state.epoch, global_step=state.global_step, best_acc=state.best_acc,
        rng=runtime_module.rng_state(),
        train_config=config.to_dict(),
    )
    if ema is not None:
        payload["train_model"] = {k: v.detach().cpu() for k, v in task.model.state_dict().items()}
        payload["ema_averaged"] = ema.n_averaged.cpu()
    return payload


def save_training_checkpoint(payload: dict, folder: Path, names: list[str], keep_max: int) -> None:
    """Serialise once, write every name atomically, then prune numbered checkpoints beyond keep_max."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    for name in names:
        atomic_write_bytes(folder / name, data)
    numbered = sorted((p for p in folder.iterdir() if CHECKPOINT_PATTERN.match(p.name)),
                      key=lambda p: tuple(int(x) for x in CHECKPOINT_PATTERN.match(p.name).groups()))
    for old in numbered[:-keep_max]:
        old.unlink(missing_ok=True)


def _restore(path: Path, task: TrainTask, ema, optimizer, scaler) -> LoopState:
    from mobilenetv2.checkpoint import read_torch_file

    payload = read_torch_file(path)
    if not isinstance(payload, dict) or "optimizer" not in payload or "global_step" not in payload:
        raise CheckpointError(f"{path} is not a training checkpoint (no optimizer state); use --pretrained instead")
    weights = payload.get("train_model") or payload["model"]
    try:
        task.model.load_state_dict(weights)
        optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} does not fit this run's network or options: {str(exc).splitlines()[0]}") from None
    scaler.load_state_dict(payload["scaler"])
    if ema is not None:
        if "train_model" in payload:
            ema.module.load_state_dict(payload["model"])
            ema.n_averaged.copy_(payload["ema_averaged"])
        else:
            ema.module.load_state_dict(weights)
    runtime_module.set_rng_state(payload["rng"])
    return LoopState(payload["epoch"], payload["global_step"], payload.get("best_acc"))


# ---------------------------------------------------------------- the loop

def train_step(trainable: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, criterion: nn.Module,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, runtime: Runtime) -> tuple[torch.Tensor, bool]:
    """One optimizer step; returns the loss and whether fp16 overflow made the scaler skip the step."""
    inputs, labels = runtime.to_input(inputs), labels.to(runtime.device, non_blocking=True)
    with runtime.autocast():
        loss = criterion(trainable(inputs), labels)
    optimizer.zero_grad(set_to_none=True)
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), scale_before is not None and scaler.get_scale() < scale_before


def fit(task: TrainTask, config: TrainConfig, runtime: Runtime, monitor: RunMonitor, output: Path | None,
        class_names: list[str], resume: Path | None = None) -> LoopState:
    """The one training loop."""
    model = task.model
    optimizer = make_optimizer(model, config)
    scaler = runtime.grad_scaler()
    ema = None
    if config.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
    state = _restore(resume, task, ema, optimizer, scaler) if resume else LoopState()
    schedule = SeedSchedule(config.lr_init, config.lr_max, config.lr_end, config.warmup_epochs, config.epochs,
                            task.steps_per_epoch)
    criterion = SeedLabelSmoothingLoss(config.label_smoothing)
    checkpoints = output / "checkpoints" if output else None
    preprocess = config.preprocess
    skipped_total = skipped_steps = 0
    if resume:
        monitor.line(f"resumed from {resume} at epoch {state.epoch}, step {state.global_step}")

    while state.epoch < config.epochs and not (config.max_steps and state.global_step >= config.max_steps):
        epoch = state.epoch
        task.trainable.train()
        done_in_epoch = state.global_step - epoch * task.steps_per_epoch
        losses = torch.zeros((), dtype=torch.float64, device=runtime.device)
        steps_run = 0
        epoch_start = time.perf_counter()
        monitor.start_epoch(task.steps_per_epoch - done_in_epoch, f"epoch {epoch + 1}/{config.epochs}")
        wait_start = time.perf_counter()
        for step_in_epoch, (inputs, labels, skipped) in enumerate(task.train_batches(epoch, done_in_epoch), done_in_epoch):
            skipped_total += skipped
            # unreadable images left nothing to learn from (or one image, which BatchNorm cannot normalise at
            # small sizes): the batch's place in the schedule passes without a step
            if len(labels) == 0 or (len(labels) == 1 and config.batch_size > 1):
                state.global_step += 1
                wait_start = time.perf_counter()
                continue
            data_wait = time.perf_counter() - wait_start
            lr = schedule(state.global_step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, overflowed = train_step(task.trainable, inputs, labels, criterion, optimizer, scaler, runtime)
            skipped_steps += overflowed
            if ema is not None:
                ema.update_parameters(model)
            losses += loss
            steps_run += 1
            state.global_step += 1
            step_seconds = time.perf_counter() - wait_start
            if monitor.enabled:  # metrics.jsonl gets every step; the seed's line every log_every steps
                value = loss.item()
                monitor.record("step", epoch=epoch, step=step_in_epoch, global_step=state.global_step - 1, loss=value,
                               lr=lr, images_per_s=len(labels) * runtime.world_size / max(step_seconds, 1e-9),
                               data_wait_s=data_wait)
                if step_in_epoch % config.log_every == 0 or step_in_epoch == task.steps_per_epoch - 1:
                    monitor.line(step_line(epoch, config.epochs, step_in_epoch, task.steps_per_epoch, value,
                                           losses.item() / steps_run, step_seconds * 1000, lr))
            monitor.advance()
            wait_start = time.perf_counter()
            if config.max_steps and state.global_step >= config.max_steps:
                break
        monitor.end_epoch()
        finished_epoch = state.global_step >= (epoch + 1) * task.steps_per_epoch
        if finished_epoch:
            state.epoch += 1
        epoch_seconds = time.perf_counter() - epoch_start
        totals = runtime.all_reduce_sum(torch.stack([losses, torch.tensor(float(steps_run), dtype=torch.float64,
                                                                              device=runtime.device)]))
        mean_loss = (totals[0] / totals[1].clamp(min=1)).item()
        result = None
        if task.evaluate is not None and finished_epoch and (state.epoch % config.eval_every == 0 or state.epoch == config.epochs):
            evaluated = ema.module if ema is not None else model
            evaluated.eval()
            result = task.evaluate(evaluated)
            state.best_acc = max(result.top1, state.best_acc or 0.0)
        monitor.line(epoch_line(epoch_seconds * 1000, epoch_seconds * 1000 / max(steps_run, 1), mean_loss,
                                result.top1 if result else None, state.best_acc if result else None))
        monitor.record("epoch", epoch=epoch, global_step=state.global_step, train_loss=mean_loss, time_s=epoch_seconds,
                       lr=schedule(max(state.global_step - 1, 0)), steps=steps_run,
                       eval_top1=result.top1 if result else None, eval_top5=result.top5 if result else None,
                       eval_loss=result.loss if result else None, eval_count=result.count if result else None,
                       skipped_images=skipped_total, skipped_fp16_steps=skipped_steps)
        if runtime.is_main and checkpoints is not None:
            names = ["last.pt"]
            if finished_epoch and (state.epoch % config.save_every == 0 or state.epoch == config.epochs):
                names.append(f"mobilenetv2-{state.epoch}_{task.steps_per_epoch}.pt")
            if result is not None and result.top1 >= state.best_acc:
                names.append("best.pt")
            payload = _checkpoint_payload(task, ema, optimizer, scaler, state, class_names, preprocess, config)
            save_training_checkpoint(payload, checkpoints, names, config.keep_max)
        runtime.barrier()
    if skipped_total:
        monitor.line(f"skipped {skipped_total} unreadable image(s)")
    return state


# ---------------------------------------------------------------- entry point

def _output_folder(config: TrainConfig, runtime: Runtime) -> Path:
    name = config.output or f"runs/{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if runtime.distributed:  # every rank must agree on rank 0's clock
        holder = [name]
        torch.distributed.broadcast_object_list(holder, src=0)
        name = holder[0]
    return Path(name)


def _resume_path(config: TrainConfig, output: Path) -> Path | None:
    if not config.resume:
        return None
    if config.resume == "auto":
        if not config.output:
            raise UserError("--resume auto needs --output (the run folder to continue)")
        last = output / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    path = Path(config.resume)
    if not path.is_file():
        raise UserError(f"--resume checkpoint not found: {path}")
    return path


def run_training(config: TrainConfig) -> LoopState:
    """Validate everything, then build the task for the mode and run the loop. Nothing is written on bad input."""
    splits = data_module.find_splits(config.data)
    runtime_module.seed_everything(config.seed)  # the same initial weights on every rank and every run
    loaded = read_weights(config.pretrained) if config.pretrained else None
    setup = build_model(config, splits.classes, loaded)
    runtime = runtime_module.setup(config.device, config.amp, config.channels_last)
    try:
        output = _output_folder(config, runtime)
        resume = _resume_path(config, output)
        runtime_module.seed_everything(config.seed + runtime.rank)  # augmentation differs across ranks
        model = runtime.prepare_model(setup.model)
        if config.freeze == "backbone":
            from mobilenetv2.features import feature_task

            task, runtime = feature_task(config, model, splits, setup.class_names, runtime, output)
            if task is None:  # other ranks helped extract features; the head trains on rank 0
                return LoopState()
        elif config.in_memory:
            task = memory_task(config, model, splits, setup.class_names, runtime)
        else:
            task = image_task(config, model, splits, setup.class_names, runtime)
        monitor = RunMonitor(output, enabled=runtime.is_main, tensorboard=config.tensorboard)
        if runtime.is_main:
            write_yaml(config.to_dict(), output / "config.yaml")
        for note in setup.notes + task.notes:
            monitor.line(note)
        monitor.line(f"device {runtime.device}, world size {runtime.world_size}, amp {runtime.amp_dtype or 'off'}, "
                     f"{task.steps_per_epoch} steps per epoch")
        try:
            return fit(task, config, runtime, monitor, output, setup.class_names, resume)
        finally:
            monitor.close()
    finally:
        runtime_module.teardown()
