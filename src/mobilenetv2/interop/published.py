"""Published MobileNetV2 weights by name: `torchvision:IMAGENET1K_V2`, `timm:mobilenetv2_100.ra_in1k`, ...

Each name resolves to a file in the cache its library uses (torch.hub's `checkpoints/` folder for torchvision's,
the Hugging Face hub cache for timm's), downloaded once when online, and its contents checked against the published
hash on every use: torchvision's sha256 prefix in the file name, the Hugging Face file's sha256 (its LFS ETag, the
name of the cached blob). Offline and not cached: one line naming the file and where to put it.

`MOBILENETV2_TORCHVISION_URL` replaces torchvision's download base (a mirror); Hugging Face's own `HF_ENDPOINT`
and `HF_HUB_OFFLINE` work as they do for timm.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mobilenetv2.config import Preprocess
from mobilenetv2.errors import CheckpointError, UserError, first_line
from mobilenetv2.files import file_sha256

TORCHVISION_BASE = "https://download.pytorch.org/models/"
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")  # torch.hub's convention: NAME-SHA256PREFIX.pth


@dataclass(frozen=True)
class Published:
    source: str  # torchvision | timm
    file: str  # torchvision: the file name under its download base; timm: the Hugging Face repo id
    preprocess: Preprocess  # the publisher's eval contract


def _timm(repo: str) -> Published:
    # timm's MobileNetV2 weights: crop_pct 0.875 (resize 256 for 224), bicubic, ImageNet mean and std
    return Published("timm", repo, Preprocess(image_size=224, resize_size=256, interpolation="bicubic"))


PUBLISHED = {
    # torchvision's: 71.878 % and 72.154 % top-1 on ImageNet-1k by its own weights' metadata
    "torchvision:IMAGENET1K_V1": Published("torchvision", "mobilenet_v2-b0353104.pth",
                                           Preprocess(image_size=224, resize_size=256)),
    "torchvision:IMAGENET1K_V2": Published("torchvision", "mobilenet_v2-7ebf99e0.pth",
                                           Preprocess(image_size=224, resize_size=232)),
    "timm:mobilenetv2_050.lamb_in1k": _timm("timm/mobilenetv2_050.lamb_in1k"),
    "timm:mobilenetv2_100.ra_in1k": _timm("timm/mobilenetv2_100.ra_in1k"),
    "timm:mobilenetv2_140.ra_in1k": _timm("timm/mobilenetv2_140.ra_in1k"),
}
TIMM_FILE = "model.safetensors"


def is_published_name(value: str) -> bool:
    """Whether `value` asks for published weights (library:NAME) rather than naming a file."""
    return value.split(":", 1)[0] in ("torchvision", "timm") and not Path(value).exists()


def _torchvision_file(entry: Published, name: str) -> Path:
    import torch.hub

    target = Path(torch.hub.get_dir()) / "checkpoints" / entry.file
    prefix = HASH_IN_NAME.search(entry.file).group(1)
    if not target.is_file():
        url = os.environ.get("MOBILENETV2_TORCHVISION_URL", TORCHVISION_BASE).rstrip("/") + "/" + entry.file
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(target), hash_prefix=prefix, progress=False)
        except RuntimeError as exc:  # torch.hub's hash mismatch (it deletes the partial file)
            raise CheckpointError(f"{name}: the download from {url} does not match its published sha256 "
                                  f"{prefix}... ({first_line(exc)})") from None
        except OSError as exc:  # offline, refused, not found (urllib's URLError and HTTPError are OSErrors)
            raise UserError(f"{name} is not cached and could not be downloaded ({first_line(exc)}): put "
                            f"{entry.file} from {TORCHVISION_BASE}{entry.file} at {target}") from None
    if not file_sha256(target).startswith(prefix):
        raise CheckpointError(f"{name}: {target} does not match its published sha256 {prefix}...; delete it "
                              "to download it again")
    return target


def _timm_file(entry: Published, name: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise UserError(f"{name} comes from the Hugging Face hub: pip install 'mobilenetv2[recipes]'") from None
    try:
        path = Path(hf_hub_download(entry.file, TIMM_FILE))
    except LocalEntryNotFoundError as exc:
        raise UserError(f"{name} is not cached and could not be downloaded ({first_line(exc)[:120]}): run once "
                        f"online, or put {TIMM_FILE} of https://huggingface.co/{entry.file} in the Hugging Face "
                        f"cache (huggingface-cli download {entry.file} {TIMM_FILE})") from None
    except Exception as exc:  # noqa: BLE001 - the hub client's HTTP and repository errors
        raise UserError(f"{name}: the Hugging Face hub refused it ({first_line(exc)[:160]})") from None
    blob = path.resolve()
    published = blob.name if re.fullmatch(r"[a-f0-9]{64}", blob.name) else None
    if published is None:
        raise CheckpointError(f"{name}: {path} has no published sha256 in the cache (blob {blob.name})")
    if file_sha256(blob) != published:
        raise CheckpointError(f"{name}: {blob} does not match its published sha256 {published[:12]}...; delete it "
                              "to download it again")
    return path


def resolve(name: str) -> tuple[Path, Published]:
    """The checked local file of the published weights `name`, downloading them into their library's cache when
    they are not there yet."""
    entry = PUBLISHED.get(name)
    if entry is None:
        known = ", ".join(PUBLISHED)
        raise UserError(f"no published MobileNetV2 weights named {name!r}; we know {known}")
    return (_torchvision_file if entry.source == "torchvision" else _timm_file)(entry, name), entry
