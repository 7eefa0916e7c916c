"""Our checkpoint format and the one loader for every format users have.

A `.pt` file holds plain data only (tensors, numbers, strings, lists, dicts) and is read with
`torch.load(..., weights_only=True)`: a pickle that carries code is refused and never runs. It carries the model
config, class names and the preprocessing contract. `.safetensors` files carry the same metadata as JSON.
Every write goes to a temp file in the same folder, then is renamed over the target.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mobilenetv2.config import Preprocess
from mobilenetv2.errors import CheckpointError
from mobilenetv2.interop import keymaps
from mobilenetv2.model import SEED_INVERTED_RESIDUAL_SETTING, STEM_CHANNELS, LAST_CHANNELS, MobileNetV2, make_divisible

FORMAT_NAME = "mobilenetv2"
FORMAT_VERSION = 1
MAX_SAFETENSORS_HEADER = 100 << 20
# widths users know, tried first when a checkpoint's width is inferred from its channel counts
_COMMON_WIDTHS = (1.0, 0.5, 0.75, 0.35, 0.25, 1.4, 1.3, 0.1, 1.5, 2.0, 0.6, 0.9, 1.2, 1.1, 0.8, 0.7)


# ---------------------------------------------------------------- atomic writes

def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(file)` on a temp file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda handle: torch.save(obj, handle))


# ---------------------------------------------------------------- saving

def model_metadata(model: MobileNetV2, class_names=None, preprocess: Preprocess | None = None) -> dict[str, Any]:
    if class_names is not None and len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a {model.num_classes}-class model")
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": {"num_classes": model.num_classes, "width_mult": model.width_mult},
        "class_names": list(class_names) if class_names is not None else None,
        "preprocess": (preprocess or Preprocess()).to_dict(),
    }


def unwrap(model: torch.nn.Module) -> MobileNetV2:
    """The bare network inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_model(model: torch.nn.Module, path: str | os.PathLike, *, class_names=None, preprocess=None,
               extra: dict[str, Any] | None = None) -> None:
    """Write `model` as `.pt` (default) or `.safetensors`, with its config, class names and preprocessing."""
    model = unwrap(model)
    metadata = model_metadata(model, class_names, preprocess)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save

        data = save(state, metadata={"mobilenetv2": json.dumps(metadata)})
        atomic_write_bytes(path, data)
        return
    atomic_torch_save({**metadata, "model": state, **(extra or {})}, path)


# ---------------------------------------------------------------- loading

@dataclass
class LoadedWeights:
    """Weights read from any format, renamed onto our keys (not yet shape-checked against a network)."""

    state_dict: dict[str, torch.Tensor]
    source_format: str
    width_mult: float | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    ignored: list[str] = field(default_factory=list)


def read_torch_file(path: Path) -> Any:
    """A torch file's contents, plain data only: a pickle that carries code is refused before anything runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        reason = next((line for line in first if "Unsupported" in line or "global" in line.lower()), "not plain data")
        raise CheckpointError(f"{path}: refused, the file is not plain data and may carry code ({reason.strip()})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({str(exc).splitlines()[0][:200]})") from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    with path.open("rb") as handle:
        head = handle.read(8)
    header_size = int.from_bytes(head, "little") if len(head) == 8 else -1
    if header_size < 2 or header_size > min(MAX_SAFETENSORS_HEADER, path.stat().st_size - 8):
        raise CheckpointError(f"{path}: not a readable safetensors file (bad header size)")
    try:
        with safe_open(str(path), framework="pt") as handle:  # one open: metadata and tensors
            return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _as_tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return obj


def read_weights(path: str | os.PathLike) -> LoadedWeights:
    """Read any supported format and rename its keys onto ours."""
    from mobilenetv2.interop import mindspore

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if path.suffix == ".safetensors":
        tensors, meta = _read_safetensors(path)
        ours = json.loads(meta["mobilenetv2"]) if "mobilenetv2" in meta else None
        return _from_tensors(tensors, ours, path)
    if magic.startswith(b"PK") or path.suffix in (".pt", ".pth", ".bin", ".tar"):
        obj = read_torch_file(path)
        ours = obj if isinstance(obj, dict) and obj.get("format") == FORMAT_NAME else None
        return _from_tensors(_as_tensor_dict(obj, path), ours, path)
    arrays = mindspore.read_checkpoint(path)
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    mapped = keymaps.rename_keys(tensors, keymaps.MINDSPORE)
    return _with_inferred_shape(LoadedWeights(mapped.state_dict, "mindspore", ignored=mapped.ignored))


def _from_tensors(tensors, ours: dict | None, path: Path) -> LoadedWeights:
    if ours is not None:
        if ours.get("version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{path}: written by a newer mobilenetv2 (format version {ours.get('version')})")
        mapped = keymaps.rename_keys(tensors, keymaps.OURS)
        config = ours.get("config", {})
        loaded = LoadedWeights(
            mapped.state_dict, FORMAT_NAME, width_mult=config.get("width_mult"), num_classes=config.get("num_classes"),
            class_names=ours.get("class_names"), preprocess=Preprocess.from_dict(ours.get("preprocess") or {}),
        )
        return _with_inferred_shape(loaded)
    layout = keymaps.detect_layout(list(tensors))
    mapped = keymaps.rename_keys(tensors, layout)
    return _with_inferred_shape(LoadedWeights(mapped.state_dict, layout.name, ignored=mapped.ignored))


def channel_plan(width_mult: float, setting=SEED_INVERTED_RESIDUAL_SETTING) -> list[int]:
    """Output channels of every conv stage: stem, each block, last."""
    plan = [make_divisible(STEM_CHANNELS * width_mult)]
    for _t, c, n, _s in setting:
        plan += [make_divisible(c * width_mult)] * n
    return plan + [make_divisible(LAST_CHANNELS * max(1.0, width_mult))]


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


def infer_width(state: dict[str, torch.Tensor]) -> float:
    plan = _checkpoint_plan(state)
    candidates = list(_COMMON_WIDTHS) + [round(0.05 * i, 2) for i in range(1, 81)] + [round(0.01 * i, 2) for i in range(1, 401)]
    for width in candidates:
        if channel_plan(width) == plan:
            return width
    raise CheckpointError(f"checkpoint channels {plan} match no width of the seed's MobileNetV2")


def _with_inferred_shape(loaded: LoadedWeights) -> LoadedWeights:
    state = loaded.state_dict
    if "backbone.0.0.weight" not in state:
        raise CheckpointError(f"{loaded.source_format} checkpoint is missing tensor 'backbone.0.0.weight'")
    if loaded.width_mult is None:
        loaded.width_mult = infer_width(state)
    if loaded.num_classes is None:
        head = state.get("head.classifier.weight")
        if head is None:
            raise CheckpointError(f"{loaded.source_format} checkpoint is missing tensor 'head.classifier.weight'")
        loaded.num_classes = int(head.shape[0])
    return loaded


def load_state_into(model: MobileNetV2, loaded: LoadedWeights, *, skip_head: bool = False) -> None:
    """Copy checked weights into `model`; with `skip_head` the head keeps its fresh init (the seed's filter_head)."""
    target = model.state_dict()
    skip = ("head.",) if skip_head else ()
    checked = keymaps.apply_key_map(loaded.state_dict, target, layout_name=loaded.source_format, skip_prefixes=skip)
    model.load_state_dict(checked, strict=not skip_head)


def load_model(path: str | os.PathLike, *, num_classes: int | None = None, width_mult: float | None = None) -> MobileNetV2:
    """A MobileNetV2 in eval mode from any supported file, with `.class_names` and `.preprocess` attached.

    `num_classes` / `width_mult`, when given, must agree with the file.
    """
    loaded = read_weights(path)
    if width_mult is not None and channel_plan(width_mult) != channel_plan(loaded.width_mult):
        raise CheckpointError(f"{path}: checkpoint has width {loaded.width_mult}, asked for {width_mult}")
    if num_classes is not None and num_classes != loaded.num_classes:
        raise CheckpointError(f"{path}: checkpoint has {loaded.num_classes} classes, asked for {num_classes}")
    model = MobileNetV2(num_classes=loaded.num_classes, width_mult=loaded.width_mult)
    load_state_into(model, loaded)
    model.class_names = loaded.class_names
    model.preprocess = loaded.preprocess
    return model.eval()
