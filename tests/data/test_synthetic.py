"""The synthetic ImageNet-like JPEG folder (`mobilenetv2 data synthetic`)."""

from PIL import Image

from mobilenetv2.cli import main
from mobilenetv2.data.folders import find_splits
from mobilenetv2.data.synthetic import SOURCE_PHOTOS


def test_synthetic_jpegs_look_like_imagenet_and_are_reused(tmp_path, capsys):
    out = tmp_path / "synthetic"
    assert main(["data", "synthetic", str(out), "--images", "200", "--size", "100x75"]) == 0
    splits = find_splits(out)
    assert splits.classes == sorted(SOURCE_PHOTOS)
    train, val = sorted(out.glob("train/*/*.jpg")), sorted(out.glob("val/*/*.jpg"))
    assert (len(train), len(val)) == (180, 20)  # a tenth of every class goes to val
    sizes = set()
    for path in train + val:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert 80 <= image.width <= 120 and 60 <= image.height <= 90  # about 100x75, varied by +-20 %
            sizes.add(image.size)
    assert len(sizes) > 50  # varied, as real photos are
    stamp = train[0].stat().st_mtime_ns
    assert main(["data", "synthetic", str(out), "--images", "200", "--size", "100x75"]) == 0
    assert train[0].stat().st_mtime_ns == stamp  # written once, reused
    capsys.readouterr()
    assert main(["data", "synthetic", str(tmp_path / "bad"), "--images", "5", "--size", "huge"]) == 2
    assert "size must look like 500x375" in capsys.readouterr().err


def test_without_a_val_share_there_is_no_val_folder(tmp_path):
    from mobilenetv2.data.synthetic import write_synthetic

    out = write_synthetic(tmp_path / "s", images=20, size="64x48", val_fraction=0)
    assert not (out / "val").exists() and find_splits(out).val is None
    assert len(list(out.glob("train/*/*.jpg"))) == 20
