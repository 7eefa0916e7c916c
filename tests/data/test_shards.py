"""`mobilenetv2 data shard`: WebDataset tar shards of an ImageFolder tree with the original bytes, a manifest timm's
reader parses, unreadable files skipped and counted, the same bytes on every run, and a killed run leaving no
manifest."""

import hashlib
import json
import shutil
import tarfile

import pytest

from conftest import one_line_exit_2, write_image_folder
from mobilenetv2.cli import main
from mobilenetv2.data import shards


@pytest.fixture
def tree(tmp_path):
    """Real photos: train 3 classes x 8 JPEGs plus one PNG (25 readable) and one broken file, val 3 x 5."""
    root = tmp_path / "photos"
    write_image_folder(root / "train", per_class=8, seed=0)
    write_image_folder(root / "val", per_class=5, seed=1)
    shutil.copy(next((root / "train" / "coffee").iterdir()), root / "train" / "coffee" / "copy.png")
    from PIL import Image

    Image.open(root / "train" / "coffee" / "copy.png").save(root / "train" / "coffee" / "as_png.png", format="PNG")
    (root / "train" / "coffee" / "copy.png").unlink()
    (root / "train" / "chelsea" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def _members(path):
    with tarfile.open(path) as tar:
        return [(member, tar.extractfile(member).read()) for member in tar.getmembers()]


def test_shards_hold_the_original_bytes_with_labels_and_a_manifest_timm_reads(tree, tmp_path, capsys):
    from timm.data.readers.reader_wds import _load_info, _parse_split_info

    out = tmp_path / "shards"
    assert main(["data", "shard", str(tree), str(out), "--shard-size", "64kB", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "train: 25 samples" in printed and "skipped 1 unreadable" in printed and "broken.jpg" in printed
    info = _load_info(str(out))
    train, val = _parse_split_info("train", info), _parse_split_info("validation", info)
    assert (train.num_samples, val.num_samples) == (25, 15)
    assert len(train.filenames) > 1 and sum(train.shard_lengths) == 25  # 64kB shards: several
    assert info["class_names"] == ["astronaut", "chelsea", "coffee"] and info["splits"]["train"]["skipped"] == 1
    originals = {}
    for label, name in enumerate(info["class_names"]):
        for path in (tree / "train" / name).iterdir():
            originals[hashlib.sha256(path.read_bytes()).hexdigest()] = (label, path.suffix)
    seen, extensions = [], set()
    for filename, length in zip(train.filenames, train.shard_lengths):
        members = _members(out / filename)
        assert len(members) == 2 * length
        for (image, data), (cls, label) in zip(members[::2], members[1::2]):
            key, extension = image.name.rsplit(".", 1)
            assert cls.name == f"{key}.cls" and image.mtime == 0 and image.uname == ""
            source_label, _suffix = originals[hashlib.sha256(data).hexdigest()]  # the bytes, not a re-encoding
            assert int(label) == source_label
            seen.append(hashlib.sha256(data).hexdigest())
            extensions.add(extension)
    assert len(set(seen)) == 25 and extensions == {"jpg", "png"}
    first_shard_labels = [int(label) for _, label in _members(out / train.filenames[0])[1::2]]
    assert first_shard_labels != sorted(first_shard_labels)  # shuffled once: classes interleave within a shard


def test_the_same_tree_gives_the_same_bytes_and_a_killed_run_leaves_no_manifest(tree, tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["data", "shard", str(tree), str(first), "--shard-size", "64kB"]) == 0
    original = shards._write_shard
    calls = []

    def dying(path, samples):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed in the middle of the second shard
        original(path, samples)

    monkeypatch.setattr(shards, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        shards.write_shards(tree, second, shards.parse_size("64kB"))
    assert not (second / shards.MANIFEST).exists()
    monkeypatch.setattr(shards, "_write_shard", original)
    assert main(["data", "shard", str(tree), str(second), "--shard-size", "64kB", "--workers", "1"]) == 0
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # a larger shard size over the same folder: the manifest names only what this run wrote
    assert main(["data", "shard", str(tree), str(second), "--shard-size", "10MB"]) == 0
    info = json.loads((second / shards.MANIFEST).read_text())
    named = {f for split in info["splits"].values() for f in split["filenames"]}
    assert named == {p.name for p in second.glob("*.tar")} and len(info["splits"]["train"]["filenames"]) == 1


@pytest.mark.parametrize("argv", [["data", "shard", "{tmp}/nowhere", "{tmp}/out"],
                                  ["data", "shard", "{tree}", "{tmp}/out", "--shard-size", "huge"],
                                  ["data", "shard", "{tree}", "{tmp}/out", "--shard-size", "1kB"],
                                  ["data", "shard", "{tree}"]])
def test_bad_shard_input_is_one_line_exit_2(tree, tmp_path, capsys, argv):
    line = one_line_exit_2(capsys, [a.format(tmp=tmp_path, tree=tree) for a in argv])
    assert "shard" in line or "train/" in line or "SRC OUT" in line
