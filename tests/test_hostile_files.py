"""Model files from strangers: every reader (our .pt, .safetensors, MindSpore .ckpt, exported .onnx) given any
bytes returns a model or raises one UserError (one line, exit 2 at the command line): no other exception, no hang,
and a header that declares more than the file holds is refused before anything that size is allocated.

The fuzz cases are bounded for CI; `tools/fuzz_readers.py` runs the same properties for longer."""

import struct
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MS_CHECKPOINT, REPO, one_line_exit_2
from mobilenetv2 import MobileNetV2, save_model
from mobilenetv2.checkpoint import load_model
from mobilenetv2.errors import UserError

sys.path.insert(0, str(REPO / "tools"))
import fuzz_readers  # noqa: E402 - tools/ is not a package

CASES = 40  # per format and strategy in CI


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """One valid small file of every format, as bytes (the long run's own originals)."""
    return fuzz_readers.originals(tmp_path_factory.mktemp("originals"))


def open_any(path):
    """What `eval` and `predict` do with a model file: read, build, run once. On torch: under `auto` a mutant that
    still reads is exported to ONNX and timed (5-9 s each on a 2-core VM), which tests the export, not the reader;
    the long fuzz run (tools/fuzz_readers.py) keeps `auto`."""
    fuzz_readers.open_any(path, "onnx" if path.suffix == ".onnx" else "torch")


def assert_model_or_one_error(tmp_path, suffix: str, data: bytes) -> None:
    path = tmp_path / f"fuzzed.{suffix}"
    path.write_bytes(data)
    try:
        open_any(path)
    except UserError as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) < 600, message


def mutations(original: bytes):
    """Truncations, byte flips, spliced-in random runs, and plain random bytes."""
    size = len(original)
    truncated = st.integers(0, size).map(lambda n: original[:n])
    flipped = st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 255)), min_size=1, max_size=8).map(
        lambda flips: _flip(original, flips))
    spliced = st.tuples(st.integers(0, size), st.binary(min_size=1, max_size=64)).map(
        lambda cut: original[: cut[0]] + cut[1] + original[cut[0] + len(cut[1]):])
    return st.one_of(truncated, flipped, spliced, st.binary(max_size=2048))


def _flip(data: bytes, flips) -> bytes:
    buffer = bytearray(data)
    for position, value in flips:
        buffer[position] ^= value
    return bytes(buffer)


@pytest.mark.parametrize("suffix", ["pt", "safetensors", "ckpt", "onnx"])
def test_any_bytes_give_a_model_or_one_clear_error(originals, tmp_path, suffix):
    @settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(data=mutations(originals[suffix]))
    def check(data):
        assert_model_or_one_error(tmp_path, suffix, data)

    check()


@pytest.mark.parametrize("suffix", ["pt", "safetensors", "ckpt", "onnx"])
def test_empty_and_foreign_files_end_in_one_line(tmp_path, capsys, suffix):
    for content in (b"", b"<html>404</html>", b"\x00" * 100):
        path = tmp_path / f"bad.{suffix}"
        path.write_bytes(content)
        err = one_line_exit_2(capsys, ["convert", str(path), "--output", str(tmp_path / "out.pt")])
        assert str(path) in err
        one_line_exit_2(capsys, ["predict", "--checkpoint", str(path), str(MS_CHECKPOINT)])


def test_a_safetensors_header_declaring_a_huge_tensor_is_refused_unallocated(tmp_path):
    """8 bytes of header length, then JSON promising 10^12 floats that the file does not hold."""
    header = b'{"backbone.0.0.weight":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,4000000000000]}}'
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_model(path)
    lying = tmp_path / "lying_length.safetensors"
    lying.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    with pytest.raises(UserError):
        load_model(lying)


def test_a_mindspore_tensor_declaring_more_than_it_holds_is_refused(tmp_path):
    from mobilenetv2.interop.mindspore import read_checkpoint, write_checkpoint

    path = tmp_path / "huge.ckpt"
    write_checkpoint({"backbone.0.0.weight": np.zeros((2, 2), np.float32)}, path)
    data = path.read_bytes()
    # the dims are varints in the protobuf: rewrite the shape [2, 2] as [2, 2^40]
    patched = data.replace(b"\x08\x02\x08\x02", b"\x08\x02\x08\x80\x80\x80\x80\x80\x20", 1)
    assert patched != data
    path.write_bytes(patched)
    with pytest.raises(UserError):
        read_checkpoint(path)


@pytest.mark.parametrize("key, value", [("num_classes", 10**9), ("num_classes", 7), ("width_mult", 1000.0),
                                        ("width_mult", 0.5), ("round_nearest", 0), ("dropout", 5.0),
                                        ("inverted_residual_setting", [[16, 4096, 16, 1]] * 32),
                                        ("inverted_residual_setting", "x")])
def test_metadata_cannot_make_us_build_what_the_file_does_not_hold(tmp_path, key, value):
    """The network is allocated before its weights are checked: every constructor argument a file carries is
    bounded and must agree with the tensors it holds (measured without the checks: 1e9 classes or width 1000
    asked for terabytes)."""
    path = tmp_path / "model.pt"
    save_model(MobileNetV2(num_classes=3, width_mult=0.25), path)
    record = torch.load(path, weights_only=True)
    record["config"] = {**record["config"], key: value}
    torch.save(record, path)
    with pytest.raises(UserError, match="configuration is not usable|checkpoint says"):
        load_model(path)


@pytest.mark.parametrize("suffix, find", [("ckpt", b"features.1"), ("onnx", b'"format"')])
def test_names_and_metadata_that_are_not_utf8_end_in_one_line(originals, tmp_path, suffix, find):
    """Found by tools/fuzz_readers.py: protobuf hands such strings back as bytes (a TypeError in the key map, a
    UnicodeDecodeError in the JSON reader)."""
    data = originals[suffix]
    at = data.index(find) + 2
    path = tmp_path / f"not_utf8.{suffix}"
    path.write_bytes(data[:at] + b"\xd5" + data[at + 1:])
    with pytest.raises(UserError, match="not text|not a JSON record"):
        open_any(path)
