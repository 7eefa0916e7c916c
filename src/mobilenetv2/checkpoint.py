"""Our checkpoint format and the one loader for every format users have.

A `.pt` file holds plain data only (tensors, numbers, strings, lists, dicts) and is read with
`torch.load(..., weights_only=True)`: a pickle that carries code is refused and never runs. It carries the model's
metadata (`mobilenetv2.metadata`): constructor arguments, class names, preprocessing contract. `.safetensors` files
carry the same record as JSON. Foreign layouts (MindSpore `.ckpt`, torchvision, timm) are renamed onto our keys by
`mobilenetv2.interop` and their width is inferred from the model's channel plan.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mobilenetv2 import metadata as metadata_schema
from mobilenetv2.errors import CheckpointError, first_line
from mobilenetv2.files import atomic_write_bytes
from mobilenetv2.interop import keymaps, mindspore, published
from mobilenetv2.metadata import ModelMetadata
from mobilenetv2.model import SEED_INVERTED_RESIDUAL_SETTING, MobileNetV2, channel_plan

MAX_SAFETENSORS_HEADER = 100 << 20
# widths users know, tried first when a checkpoint's width is inferred from its channel counts
_COMMON_WIDTHS = (1.0, 0.5, 0.75, 0.35, 0.25, 1.4, 1.3, 0.1, 1.5, 2.0, 0.6, 0.9, 1.2, 1.1, 0.8, 0.7)


# ---------------------------------------------------------------- saving

def unwrap(model: torch.nn.Module) -> MobileNetV2:
    """The bare network inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_model(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write `model` as `.pt` (default) or `.safetensors`, with everything it carries (see `MobileNetV2.metadata`)."""
    model = unwrap(model)
    record, state = model.metadata(), cpu_state(model)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save

        atomic_write_bytes(path, save(state, metadata={metadata_schema.FORMAT_NAME: json.dumps(record)}))
        return
    atomic_write_bytes(path, torch_bytes({**record, "model": state}))


# ---------------------------------------------------------------- reading

@dataclass
class LoadedWeights:
    """Weights read from any format, renamed onto our keys (not yet shape-checked against a network)."""

    state_dict: dict[str, torch.Tensor]
    source_format: str
    metadata: ModelMetadata = field(default_factory=lambda: ModelMetadata({}))
    ignored: list[str] = field(default_factory=list)

    @property
    def width_mult(self) -> float:
        return self.metadata.architecture["width_mult"]

    @property
    def num_classes(self) -> int:
        return self.metadata.architecture["num_classes"]

    @property
    def class_names(self) -> list[str] | None:
        return self.metadata.class_names

    def build(self) -> MobileNetV2:
        """A network of this file's shape and metadata, with fresh weights."""
        return MobileNetV2(**self.metadata.architecture, class_names=self.metadata.class_names,
                           preprocess=self.metadata.preprocess)


def read_torch_file(path: Path) -> Any:
    """A torch file's contents, plain data only: a pickle that carries code is refused before anything runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        reason = next((line for line in first if "Unsupported" in line or "global" in line.lower()), "not plain data")
        raise CheckpointError(f"{path}: refused, the file is not plain data and may carry code ({reason.strip()})") from None
    except Exception as exc:  # noqa: BLE001 - foreign bytes make the zip and unpickler layers raise anything
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first_line(exc)})") from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with path.open("rb") as handle:
        head = handle.read(8)
    header_size = int.from_bytes(head, "little") if len(head) == 8 else -1
    if header_size < 2 or header_size > min(MAX_SAFETENSORS_HEADER, path.stat().st_size - 8):
        raise CheckpointError(f"{path}: not a readable safetensors file (bad header size)")
    try:
        with safe_open(str(path), framework="pt") as handle:  # one open: metadata and tensors
            return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - SafetensorError, and whatever foreign bytes make torch raise
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None


def _as_tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return obj


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A file's tensors under the names the file gives them (a torch file's state dict, or a safetensors file's),
    for models of other families that our key maps do not rename."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)[0]
    return _as_tensor_dict(read_torch_file(path), path)


def read_weights(path: str | os.PathLike) -> LoadedWeights:
    """Read any supported format and rename its keys onto ours. A published name (`torchvision:IMAGENET1K_V2`,
    `timm:mobilenetv2_100.ra_in1k`, ...: interop/published.py) reads the checked file from its library's cache,
    with its publisher's preprocessing contract."""
    if published.is_published_name(str(path)):
        file, entry = published.resolve(str(path))
        loaded = read_weights(file)
        loaded.metadata = dataclasses.replace(loaded.metadata, preprocess=entry.preprocess)
        return loaded
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if path.suffix == ".safetensors":
        tensors, meta = _read_safetensors(path)
        record = meta.get(metadata_schema.FORMAT_NAME)
        if record is not None:
            try:
                record = json.loads(record)
            except ValueError:  # not JSON, or not even UTF-8
                raise CheckpointError(f"{path}: its mobilenetv2 metadata is not JSON") from None
        return _from_tensors(tensors, record, path)
    if magic.startswith(b"PK") or path.suffix in (".pt", ".pth", ".bin", ".tar"):
        obj = read_torch_file(path)
        record = obj if metadata_schema.is_ours(obj) else None
        return _from_tensors(_as_tensor_dict(obj, path), record, path)
    arrays = mindspore.read_checkpoint(path)
    mapped = keymaps.rename_keys({k: torch.from_numpy(v) for k, v in arrays.items()}, keymaps.MINDSPORE)
    return _with_inferred_shape(LoadedWeights(mapped.state_dict, "mindspore", ignored=mapped.ignored))


def _from_tensors(tensors: dict[str, torch.Tensor], record: dict | None, path: Path) -> LoadedWeights:
    if record is not None:
        mapped = keymaps.rename_keys(tensors, keymaps.OURS)
        loaded = LoadedWeights(mapped.state_dict, metadata_schema.FORMAT_NAME, metadata_schema.parse(record, str(path)))
        return _with_inferred_shape(loaded)
    layout = keymaps.detect_layout(list(tensors))
    mapped = keymaps.rename_keys(tensors, layout)
    return _with_inferred_shape(LoadedWeights(mapped.state_dict, layout.name, ignored=mapped.ignored))


def _checkpoint_plan(state: dict[str, torch.Tensor]) -> list[int]:
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("backbone.") and k.split(".")[1].isdigit()})
    plan = []
    for index in blocks:
        convs = [k for k in state if k.startswith(f"backbone.{index}.") and k.endswith("weight") and state[k].dim() == 4]
        if not convs:
            raise CheckpointError(f"checkpoint block backbone.{index} has no convolution weights")
        last = max(convs, key=lambda k: [int(p) if p.isdigit() else -1 for p in k.split(".")])
        plan.append(int(state[last].shape[0]))
    return plan


def _plan_matches(state: dict[str, torch.Tensor], architecture: dict) -> bool:
    setting = architecture.get("inverted_residual_setting") or SEED_INVERTED_RESIDUAL_SETTING
    return channel_plan(architecture["width_mult"], setting, architecture.get("round_nearest", 8)) == \
        _checkpoint_plan(state)


def infer_width(state: dict[str, torch.Tensor]) -> float:
    plan = _checkpoint_plan(state)
    candidates = list(_COMMON_WIDTHS) + [round(0.05 * i, 2) for i in range(1, 81)] + [round(0.01 * i, 2) for i in range(1, 401)]
    for width in candidates:
        if channel_plan(width) == plan:
            return width
    raise CheckpointError(f"checkpoint channels {plan} match no width of the seed's MobileNetV2")


def _with_inferred_shape(loaded: LoadedWeights) -> LoadedWeights:
    state, architecture = loaded.state_dict, loaded.metadata.architecture
    if "backbone.0.0.weight" not in state:
        raise CheckpointError(f"{loaded.source_format} checkpoint is missing tensor 'backbone.0.0.weight'")
    if architecture.get("width_mult") is None:
        architecture["width_mult"] = infer_width(state)
    if architecture.get("num_classes") is None:
        head = state.get("head.classifier.weight")
        if head is None:
            raise CheckpointError(f"{loaded.source_format} checkpoint is missing tensor 'head.classifier.weight'")
        architecture["num_classes"] = int(head.shape[0])
    head = state.get("head.classifier.weight")
    if head is not None and head.dim() == 2 and int(head.shape[0]) != architecture["num_classes"]:
        raise CheckpointError(f"{loaded.source_format} checkpoint says {architecture['num_classes']} classes; its "
                              f"head has {int(head.shape[0])}")
    if not _plan_matches(state, architecture):  # so what is built is about the size of what the file holds
        raise CheckpointError(f"{loaded.source_format} checkpoint says width {architecture['width_mult']}; its "
                              f"channels {_checkpoint_plan(state)} do not match it")
    names = loaded.metadata.class_names
    if names is not None and len(names) != architecture["num_classes"]:
        raise CheckpointError(f"{loaded.source_format} checkpoint has {len(names)} class names for "
                              f"{architecture['num_classes']} classes")
    return loaded


def load_state_into(model: MobileNetV2, loaded: LoadedWeights, *, skip_head: bool = False) -> None:
    """Copy checked weights into `model`; with `skip_head` the head keeps its fresh init (the seed's filter_head)."""
    target = model.state_dict()
    skip = ("head.",) if skip_head else ()
    checked = keymaps.apply_key_map(loaded.state_dict, target, layout_name=loaded.source_format, skip_prefixes=skip)
    model.load_state_dict(checked, strict=not skip_head)


def same_width(a: float, b: float) -> bool:
    """Two widths build the same channels (0.5 and 0.51 do)."""
    return channel_plan(a) == channel_plan(b)


def load_model(path: str | os.PathLike, *, num_classes: int | None = None, width_mult: float | None = None) -> MobileNetV2:
    """A MobileNetV2 in eval mode from any supported file, with the class names and preprocessing it carries.

    `num_classes` / `width_mult`, when given, must agree with the file.
    """
    loaded = read_weights(path)
    if width_mult is not None and not same_width(width_mult, loaded.width_mult):
        raise CheckpointError(f"{path}: checkpoint has width {loaded.width_mult}, asked for {width_mult}")
    if num_classes is not None and num_classes != loaded.num_classes:
        raise CheckpointError(f"{path}: checkpoint has {loaded.num_classes} classes, asked for {num_classes}")
    model = loaded.build()
    load_state_into(model, loaded)
    return model.eval()
