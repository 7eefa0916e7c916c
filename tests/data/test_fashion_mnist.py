"""The Fashion-MNIST ImageFolder writer."""

import pytest

from mobilenetv2.cli import main


def test_fashion_mnist_writer_reuses_and_refuses_bad_files(tmp_path, capsys):
    from mobilenetv2.data.fashion_mnist import FASHION_MNIST_CLASSES, read_idx, write_fashion_mnist
    from mobilenetv2.errors import DataError

    out = write_fashion_mnist(tmp_path / "fm", per_class=3, val_per_class=2)
    files = sorted(out.glob("train/*/*.png"))
    assert len(files) == 30 and {p.parent.name for p in files} == set(FASHION_MNIST_CLASSES)
    stamp = files[0].stat().st_mtime_ns
    write_fashion_mnist(tmp_path / "fm", per_class=3, val_per_class=2)
    assert files[0].stat().st_mtime_ns == stamp  # written once, reused
    import gzip

    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as handle:
        handle.write(b"\x00\x00\x08\x03" + (10**7).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
    with pytest.raises(DataError, match="implausible"):
        read_idx(bad)
    assert main(["data", "fashion-mnist", str(tmp_path / "x"), "--source", str(tmp_path / "nowhere")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
