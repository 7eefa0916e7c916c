"""EXIF orientation: the tag (0x0112) with which cameras and phones say how the stored pixels must be turned to
stand upright. A portrait photo from a phone is stored sideways with orientation 6 or 8; every viewer shows it
upright, and so must the network see it.

All eight values are handled (1 upright; 2-4 mirrors and a half turn; 5-8 the transposes and quarter turns), on
PIL images and on uint8 tensors (C x H x W, any device: the nvJPEG path turns the decoded batch on the GPU) with the
same result. A tag that cannot be read (a malformed EXIF block, a value outside 1-8) never stops a file from
decoding: it is read as stored, with a warning naming the file.

`Preprocess.exif` says whether orientation is applied ("apply", the default) or pixels are used as stored
("ignore": what torchvision's ImageFolder and the seed do, for parity runs against it).
"""

from __future__ import annotations

import warnings

import torch
from PIL import Image

ORIENTATION_TAG = 0x0112

# the PIL operation that turns a stored image with this orientation upright (PIL's own ImageOps.exif_transpose table)
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# the turn that undoes each one (the quarter turns undo each other; the others undo themselves)
INVERSE = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


def read_orientation(image: Image.Image, name: object = "image") -> int:
    """The EXIF orientation of an opened image (1 when it has none). A malformed EXIF block or a value outside 1-8
    is read as 1 (pixels as stored) with a warning naming `name`."""
    with warnings.catch_warnings(record=True) as complaints:  # PIL warns of a corrupt block and reads on
        warnings.simplefilter("always")
        try:
            value = image.getexif().get(ORIENTATION_TAG, 1)
        except Exception as exc:  # noqa: BLE001 - PIL's EXIF parser raises whatever a malformed block provokes
            complaints.append(exc)
    if complaints or getattr(image, "exif_problem", None):
        problem = complaints[0] if complaints else image.exif_problem  # type: ignore[attr-defined]
        detail = str(getattr(problem, "message", problem)).strip()[:80] or problem.__class__.__name__
        warnings.warn(f"{name}: malformed EXIF block ({detail}); read as stored", stacklevel=2)
        return 1
    if isinstance(value, int) and 1 <= value <= 8:
        return value
    warnings.warn(f"{name}: EXIF orientation {str(value)[:20]!r} is not 1-8, ignored", stacklevel=2)
    return 1


def pending_orientation(image: Image.Image, exif: bool, name: object = "image") -> int:
    """The turn still to apply to an opened image's pixels, as `upright_image` takes it: its orientation with `exif`,
    else 1 (as stored). Pillow's TIFF loader turns the pixels itself as it loads them, whatever is asked: such an
    image is loaded here (its size is then the upright one), and what remains is nothing with `exif`, or undoing the
    loader's turn without."""
    orientation = read_orientation(image, name)
    if orientation != 1 and image.format == "TIFF":
        image.load()
        return 1 if exif else INVERSE[orientation]
    return orientation if exif else 1


def upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) of a stored image of `size` once turned upright."""
    return (size[1], size[0]) if orientation >= 5 else size


def upright_image(image: Image.Image, orientation: int) -> Image.Image:
    """`image` turned upright (the image itself for orientation 1)."""
    return image.transpose(TRANSPOSE[orientation]) if orientation in TRANSPOSE else image


def upright_tensor(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """`pixels` (..., H, W) turned upright, as `upright_image` turns a PIL image."""
    if orientation >= 5:
        pixels = pixels.transpose(-1, -2)
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}.get(orientation)
    return pixels.flip(flips) if flips else pixels


def stored_box(box: tuple[int, int, int, int], stored: tuple[int, int], orientation: int) -> tuple[int, int, int, int]:
    """A crop box (top, left, height, width) in the upright image, as the same pixels' box in the stored one
    (`stored`: its (width, height)). Cropping there and turning the crop upright equals cropping the upright image."""
    top, left, height, width = box
    stored_width, stored_height = stored
    if orientation >= 5:  # the upright axes are the stored ones swapped
        top, left, height, width = left, top, width, height
    if orientation in (2, 3, 7, 8):  # the stored x axis runs the other way
        left = stored_width - left - width
    if orientation in (3, 4, 6, 7):  # the stored y axis does
        top = stored_height - top - height
    return top, left, height, width
