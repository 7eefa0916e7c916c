"""Knowledge distillation: a frozen teacher's logits on the student's own batch (augmented and mixed, as the student
sees it) and the losses that compare the two, wrapped as a criterion like the task loss. The loop calls every
criterion as `criterion(logits, labels, inputs)` and learns nothing about teachers.

Losses: `kl`, Hinton's: KL(teacher || student) of the softmaxes at temperature T, times T^2 so its gradients keep
their size as T changes. `dist`, DIST's (Huang et al., NeurIPS 2022): one minus the Pearson correlation of the two
softmaxes, per image across classes (inter-class) plus per class across the batch (intra-class), times T^2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mobilenetv2 import metadata
from mobilenetv2.checkpoint import load_state_into, read_state_dict, read_weights
from mobilenetv2.config import IMAGENET_MEAN, IMAGENET_STD, TrainConfig
from mobilenetv2.errors import UserError, first_line
from mobilenetv2.files import file_sha256
from mobilenetv2.model import MobileNetV2
from mobilenetv2.runtime import Runtime

DEFAULT_TEMPERATURE = {"kl": 4.0, "dist": 1.0}  # Hinton's usual T; DIST's own tau
PEARSON_EPS = 1e-8


def kl_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over the batch of KL(softmax(teacher / T) || softmax(student / T)), in float32 or wider."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    log_student = F.log_softmax(student.to(dtype) / temperature, dim=1)
    log_teacher = F.log_softmax(teacher.to(dtype) / temperature, dim=1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1).mean() * temperature ** 2


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    # a floor rather than DIST's added eps, so identical distributions correlate exactly 1 (a loss of exactly zero)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(PEARSON_EPS)


def dist_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float, inter: float = 1.0,
                      intra: float = 1.0) -> torch.Tensor:
    """DIST: T^2 * (inter * (1 - mean Pearson over images) + intra * (1 - mean Pearson over classes)) of the
    softmaxes at temperature T."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    p_student = F.softmax(student.to(dtype) / temperature, dim=1)
    p_teacher = F.softmax(teacher.to(dtype) / temperature, dim=1)
    inter_loss = 1 - _pearson_rows(p_student, p_teacher).mean()
    intra_loss = 1 - _pearson_rows(p_student.t(), p_teacher.t()).mean()
    return temperature ** 2 * (inter * inter_loss + intra * intra_loss)


LOSSES = {"kl": kl_distillation, "dist": dist_distillation}


class Teacher(nn.Module):
    """A frozen network that takes the student's normalised batch: it converts the batch to its own mean, std and
    crop size on the device, runs without gradients and always in eval mode (`train()` cannot switch it)."""

    def __init__(self, network: nn.Module, student_mean, student_std, mean, std, size: int | None):
        super().__init__()
        self.network, self.size = network.eval().requires_grad_(False), size
        student_std, std = torch.tensor(student_std), torch.tensor(std)
        # x_teacher = (x * std_s + mean_s - mean_t) / std_t, one multiply-add per channel
        self.register_buffer("scale", (student_std / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((torch.tensor(student_mean) - torch.tensor(mean)) / std).view(1, 3, 1, 1),
                             persistent=False)
        self.converts = not (torch.allclose(self.scale, torch.ones(())) and torch.allclose(self.shift, torch.zeros(())))
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.converts:
            inputs = torch.addcmul(self.shift.to(inputs.dtype), inputs, self.scale.to(inputs.dtype))
        if self.size and inputs.shape[-1] != self.size or self.size and inputs.shape[-2] != self.size:
            inputs = F.interpolate(inputs, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                   antialias=True)
        return self.network(inputs)


class CachedLogits(nn.Module):
    """The teacher of head-only training: its logits were cached after the features in each row (head_cache)."""

    def __init__(self, features: int):
        super().__init__()
        self.features = features

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[:, self.features:]


class DistillationLoss(nn.Module):
    """task_weight * task loss + weight * distillation loss between the student's logits and the teacher's on the
    same inputs."""

    def __init__(self, task_loss: nn.Module, teacher: Teacher | CachedLogits, kind: str, temperature: float, weight: float,
                 task_weight: float):
        super().__init__()
        self.task_loss, self.teacher, self.kind = task_loss, teacher, kind
        self.temperature, self.weight, self.task_weight = temperature, weight, task_weight

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        teacher_logits = self.teacher(inputs)
        distill = LOSSES[self.kind](logits, teacher_logits, self.temperature)
        if not self.task_weight:
            return self.weight * distill
        return self.task_weight * self.task_loss(logits, labels) + self.weight * distill


@dataclass(frozen=True)
class TeacherFile:
    """Which file taught a run: recorded in its checkpoints (the teacher's weights are not)."""

    path: str
    arch: str
    sha256: str

    def to_dict(self) -> dict:
        return {"path": self.path, "arch": self.arch, "sha256": self.sha256}


def _foreign_network(arch: str, path: Path, num_classes: int) -> tuple[nn.Module, tuple, tuple]:
    """A torchvision or timm model of `arch` (library:name) holding the weights in `path`, with its mean and std."""
    library, _, name = arch.partition(":")
    try:
        if library == "torchvision":
            import torchvision

            network, mean, std = torchvision.models.get_model(name, weights=None, num_classes=num_classes), \
                IMAGENET_MEAN, IMAGENET_STD
        elif library == "timm":
            try:
                import timm
            except ImportError:
                raise UserError("`teacher_arch` timm:... needs timm: pip install 'mobilenetv2[recipes]'") from None
            network = timm.create_model(name, pretrained=False, num_classes=num_classes)
            config = getattr(network, "pretrained_cfg", {}) or {}
            mean, std = tuple(config.get("mean", IMAGENET_MEAN)), tuple(config.get("std", IMAGENET_STD))
        else:
            raise UserError(f"`teacher_arch` must be torchvision:NAME or timm:NAME, got {arch!r}")
    except (ValueError, RuntimeError, KeyError) as exc:
        raise UserError(f"`teacher_arch` {arch}: {first_line(exc)}") from None
    state = read_state_dict(path)
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"`teacher` {path} does not fit {arch} with {num_classes} classes: {first_line(exc)}") from None
    return network, mean, std


def load_teacher(config: TrainConfig, student: MobileNetV2, runtime: Runtime) -> tuple[Teacher, TeacherFile] | None:
    """The teacher `config` names, on the run's device and memory format (None without one). Our files carry their
    own preprocessing; another library's model takes the student's crop size and its library's mean and std."""
    if not config.teacher:
        return None
    path = Path(config.teacher)
    if not path.is_file():
        raise UserError(f"`teacher` not found: {path}")
    student_pre = student.preprocess
    if config.teacher_arch:
        network, mean, std = _foreign_network(config.teacher_arch, path, student.num_classes)
        size = None
    else:
        loaded = read_weights(path)
        network = loaded.build()
        load_state_into(network, loaded)
        if loaded.num_classes != student.num_classes:
            raise UserError(f"`teacher` {path} has {loaded.num_classes} classes, the student {student.num_classes}")
        if loaded.class_names and student.class_names and loaded.class_names != student.class_names:
            raise UserError(f"`teacher` {path} names its classes otherwise ({', '.join(loaded.class_names[:3])}, "
                            f"...) than the data ({', '.join(student.class_names[:3])}, ...)")
        carries_contract = loaded.source_format == metadata.FORMAT_NAME
        pre = loaded.metadata.preprocess if carries_contract else student_pre
        mean, std, size = pre.mean, pre.std, pre.image_size if carries_contract else None
    teacher = Teacher(network, student_pre.mean, student_pre.std, mean, std, size)
    return runtime.prepare_model(teacher), TeacherFile(str(path), config.teacher_arch, file_sha256(path))


def distillation_loss(task_loss: nn.Module, teacher: Teacher | CachedLogits, config: TrainConfig) -> DistillationLoss:
    temperature = config.distill_temperature or DEFAULT_TEMPERATURE[config.distill_loss]
    return DistillationLoss(task_loss, teacher, config.distill_loss, temperature, config.distill_weight,
                            config.task_loss_weight)
