"""Training and eval on tar shards: the same counts and top-1 as the ImageFolder tree (both data backends, alone and
under torchrun), equal steps on every rank, each sample once per epoch where the shards divide evenly, a new shard
order each epoch, a bit-identical mid-epoch resume, shards over HTTP on loopback, through pipe: and fsspec, and
truncated shards and corrupt samples named."""

import functools
import http.server
import json
import os
import shutil
import sys
import tarfile
import threading

import pytest
import torch

from conftest import (FIVE_CLASSES, assert_same_weights, one_line_exit_2, records, subset, torchrun, train,
                      write_image_folder)
from mobilenetv2 import MobileNetV2, save_model
from mobilenetv2.cli import main
from mobilenetv2.data import shard_source, shards, streams

SHARD_SIZE = "64kB"  # 60 train samples in 4 shards, 30 val samples in 2
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_tree")
    write_image_folder(root / "train", per_class=20, seed=0)
    write_image_folder(root / "val", per_class=10, seed=1)
    return root


@pytest.fixture(scope="module")
def sharded(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("stream_shards") / "shards"
    shards.write_shards(tree, out, shards.parse_size(SHARD_SIZE))
    return out


@pytest.fixture(scope="module")
def five(fashion, tmp_path_factory):
    """Five Fashion-MNIST classes (100 val images) as a tree and as shards (several val shards)."""
    root = tmp_path_factory.mktemp("stream_five")
    subset(fashion, root / "data", FIVE_CLASSES)
    shards.write_shards(root / "data", root / "shards", shards.parse_size(SHARD_SIZE))
    return root / "data", root / "shards"


@pytest.fixture
def trained(pretrained_five):
    """A model with varied, mostly right predictions: its confusion matrix fingerprints which image got which
    label."""
    return pretrained_five


def val_shards(folder):
    return json.loads((folder / "_info.json").read_text())["splits"]["validation"]["filenames"]


def evaluated(capsys, tmp_path, data, checkpoint, *extra):
    report = tmp_path / f"eval{len(list(tmp_path.glob('eval*.json')))}.json"
    assert main(["eval", "--data", str(data), "--checkpoint", str(checkpoint), "--runtime", "torch", "--batch-size",
                 "7", "--workers", "0", "--json", str(report), *extra]) == 0, capsys.readouterr().err
    capsys.readouterr()
    result = json.loads(report.read_text())
    return result["count"], result["top1"], result["confusion_matrix"], result["skipped"]


def test_eval_on_shards_counts_and_scores_as_the_folder_on_both_backends_and_under_torchrun(
        five, trained, tmp_path, capsys):
    tree, sharded = five
    assert len(val_shards(sharded)) >= 3
    folder = evaluated(capsys, tmp_path, tree, trained)
    assert folder[0] == 100 and 0.5 < folder[1] < 1  # a real, imperfect model: the confusion matrix has off-diagonals
    assert evaluated(capsys, tmp_path, sharded, trained) == folder
    assert evaluated(capsys, tmp_path, sharded, trained, "--data-backend", "device") == folder
    assert evaluated(capsys, tmp_path, sharded, trained, "--workers", "3") == folder
    report = tmp_path / "ddp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "mobilenetv2", "eval", "--data", str(sharded), "--checkpoint", str(trained), "--runtime", "torch",
               "--batch-size", "7", "--workers", "1", "--json", str(report)]
    result = torchrun(command, timeout=180, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    ddp = json.loads(report.read_text())
    assert (ddp["count"], ddp["top1"], ddp["confusion_matrix"]) == folder[:3]


def test_training_on_shards_under_torchrun_makes_equal_steps_and_evaluates_every_sample_once(tree, sharded, tmp_path,
                                                                                               capsys):
    # 60 samples, 2 ranks, batch 8: 3 steps on each rank; 4 shards of 20, 20, 19 and 1 samples for 2 ranks x 1
    # worker, so one rank's own shards run short and it reads on (unequal steps would hang DDP until the timeout)
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "mobilenetv2", "train", "--data", str(sharded), "--output", str(run), "--width-mult", "0.25",
               "--image-size", "32", "--batch-size", "8", "--workers", "1", "--epochs", "2", "--dist-timeout", "60",
               "--lr-max", "0.05"]
    result = torchrun(command, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 steps per epoch" in result.stdout
    epochs = records(run, "epoch")
    assert [e["steps"] for e in epochs] == [3, 3] and [e["eval_count"] for e in epochs] == [30, 30]
    # shard -> train -> eval: the trained model scores on the shards what it scores on the tree, and what training
    # reported for its last epoch
    last = run / "checkpoints" / "last.pt"
    on_shards, on_tree = evaluated(capsys, tmp_path, sharded, last), evaluated(capsys, tmp_path, tree, last)
    assert on_shards == on_tree and on_shards[0] == 30
    assert on_shards[1] == pytest.approx(epochs[-1]["eval_top1"], abs=1e-9)


@pytest.mark.parametrize("backend, workers", [("pil", "2"), ("device", "0")])
def test_a_resumed_epoch_on_shards_is_bit_identical(sharded, tmp_path, backend, workers):
    # 7 steps per epoch; stopping after 3 leaves an odd number of batches done, so the two readers swap workers
    common = ["--epochs", "2", "--seed", "3", "--workers", workers, "--data-backend", backend, "--shuffle-buffer",
              "16", "--amp", "off", "--auto-augment", "ta_wide", "--random-erase", "0.25"]
    assert train(sharded, tmp_path / "straight", *common) == 0
    assert train(sharded, tmp_path / "split", *common, "--max-steps", "3") == 0
    assert train(sharded, tmp_path / "split", *common, "--resume", "auto") == 0
    assert_same_weights(tmp_path / "straight", tmp_path / "split")


def _even_shards(folder, lengths=(10, 10, 10, 10)):
    """Shards of `lengths` samples whose image bytes are their keys (read, never decoded, below)."""
    folder.mkdir()
    urls = []
    for s, length in enumerate(lengths):
        samples = [(f"s{s}k{i:02d}", f"s{s}k{i:02d}".encode(), "jpg", i % 3) for i in range(length)]
        shards._write_shard(folder / f"even-{s}.tar", samples)
        urls.append(str(folder / f"even-{s}.tar"))
    return shard_source.ShardSet("train", tuple(urls), tuple(lengths))


def _keys(shard_set, epoch, rank=0, world_size=1, workers=0, buffer=0, batch=5, skip=0):
    steps, batch = streams.steps_and_batch(shard_set.num_samples, world_size, batch)

    def item(sample):
        return sample.image.decode()

    stream = streams.ShardStream(shard_set, 3, item, list, batch, training=True, steps=steps, streams=workers,
                                 seed=7, rank=rank, world_size=world_size, shuffle_buffer=buffer)
    stream.epoch, stream.skip = epoch, skip
    return [list(b) for b in streams.checked(streams.stream_loader(stream, workers))]


def test_each_epoch_reads_every_sample_once_in_a_new_order_split_across_ranks_and_workers(tmp_path):
    even = _even_shards(tmp_path / "even")
    everything = {f"s{s}k{i:02d}" for s in range(4) for i in range(10)}
    first = _keys(even, epoch=0, buffer=8)
    assert len(first) == 8 and all(len(b) == 5 for b in first)
    assert sorted(k for b in first for k in b) == sorted(everything)  # each sample once
    assert _keys(even, epoch=0, buffer=8) == first  # the same run, the same order
    assert _keys(even, epoch=1, buffer=8) != first  # a new order each epoch
    assert [k for b in first for k in b][::10] != [f"s{s}k00" for s in range(4)]  # the buffer mixes within shards
    # 2 ranks x 2 workers: 4 readers, one shard each; every rank 4 batches, all 40 samples once in all
    ranks = [_keys(even, epoch=2, rank=r, world_size=2, workers=2) for r in range(2)]
    assert [len(r) for r in ranks] == [4, 4]
    keys = [k for r in ranks for b in r for k in b]
    assert sorted(keys) == sorted(everything)
    for rank in ranks:  # batch i from worker i mod 2, each worker one whole shard
        assert {k[:2] for b in rank[0::2] for k in b} != {k[:2] for b in rank[1::2] for k in b}
    orders = {tuple(dict.fromkeys(k[:2] for b in _keys(even, epoch=e) for k in b)) for e in range(4)}
    assert len(orders) > 1  # the shards themselves come in a new order (not only the buffer's draws)
    # unequal shards (10, 10, 10, 2): a rank whose shards hold 12 samples reads on to make its 4 full batches
    uneven = _even_shards(tmp_path / "uneven", (10, 10, 10, 2))
    for epoch in range(3):
        for rank in range(2):
            batches = _keys(uneven, epoch=epoch, rank=rank, world_size=2, batch=4)
            assert [len(b) for b in batches] == [4, 4, 4, 4]
    # resuming at batch 3 gives the rest of the epoch as it was
    whole = _keys(even, epoch=2, rank=1, world_size=2, workers=2)
    assert _keys(even, epoch=2, rank=1, world_size=2, workers=2, skip=3) == whole[3:]


@pytest.fixture
def served(five):
    sharded = five[1]
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(sharded))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_shards_over_http_through_pipes_and_fsspec_evaluate_as_local_ones(five, served, trained, tmp_path, capsys):
    import fsspec

    sharded, names = five[1], val_shards(five[1])
    pattern = f"data-validation-{{000000..{len(names) - 1:06d}}}.tar"
    local = evaluated(capsys, tmp_path, sharded, trained)
    assert evaluated(capsys, tmp_path, served + "/", trained, "--workers", "2") == local
    assert evaluated(capsys, tmp_path, f"{served}/{pattern}", trained) == local
    assert evaluated(capsys, tmp_path, f"pipe:cat {sharded}/{pattern}", trained) == local
    memory = fsspec.filesystem("memory")
    for path in sharded.iterdir():
        memory.pipe(f"/stream-test/{path.name}", path.read_bytes())
    try:
        assert evaluated(capsys, tmp_path, "memory://stream-test", trained) == local
    finally:
        memory.rm("/stream-test", recursive=True)
    os.rename(sharded / names[1], tmp_path / "moved.tar")  # gone from the server
    try:
        err = one_line_exit_2(capsys, ["eval", "--data", served + "/", "--checkpoint", str(trained), "--workers", "0"])
        assert names[1] in err and "HTTP error" in err and "--skip-bad-shards" in err
    finally:
        os.rename(tmp_path / "moved.tar", sharded / names[1])


def _rewrite(path, change):
    """Rewrite a shard with `change(name, data)` applied to every member."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            shards._member(tar, name, change(name, data))
    return [name for name, _ in members]


def test_a_truncated_shard_stops_with_its_name_unless_skipped_and_a_corrupt_sample_is_named_and_counted(
        five, sharded, trained, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(five[1], copy)
    cut = copy / "data-validation-000000.tar"
    whole = cut.read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    err = one_line_exit_2(capsys, ["eval", "--data", str(copy), "--checkpoint", str(trained), "--workers", "0"])
    assert "data-validation-000000.tar" in err
    with pytest.warns(UserWarning, match="skipping unreadable shard .*data-validation-000000.tar"):
        count, *_ = evaluated(capsys, tmp_path, copy, trained, "--skip-bad-shards")
    assert 0 < count < 100
    # a corrupt JPEG inside a shard of photos: skipped, named by shard and key, counted
    photos = tmp_path / "photos"
    shutil.copytree(sharded, photos)
    model = tmp_path / "photos.pt"
    save_model(MobileNetV2(num_classes=3, width_mult=0.25, class_names=["astronaut", "chelsea", "coffee"]), model)
    assert evaluated(capsys, tmp_path, photos, model)[0] == 30
    bad = photos / val_shards(photos)[0]
    names = _rewrite(bad, lambda name, data: data)
    first_jpeg = next(name for name in names if name.endswith(".jpg"))
    _rewrite(bad, lambda name, data: data[:4] + bytes(len(data) - 4) if name == first_jpeg else data)
    key = first_jpeg.split(".")[0]
    for backend in ("pil", "device"):
        with pytest.warns(UserWarning, match=f"skipping unreadable .*{key}.*{bad.name}|{bad.name}.*{key}"):
            count, _top1, _matrix, skipped = evaluated(capsys, tmp_path, photos, model, "--data-backend", backend)
        assert (count, skipped) == (29, 1)
    (copy / "data-train-000003.tar").unlink()
    err = one_line_exit_2(capsys, ["train", "--data", str(copy), "--output", str(tmp_path / "run"), "--workers", "0"])
    assert "shard not found" in err and "data-train-000003.tar" in err


@pytest.mark.parametrize("argv, message", [
    (["--in-memory"], "in-memory"),
    (["--balanced-sampler"], "balanced-sampler"),
    (["--shuffle-buffer=-1"], "--shuffle-buffer must be >= 0"),
])
def test_what_a_stream_cannot_do_is_refused_in_one_line(sharded, tmp_path, capsys, argv, message):
    err = one_line_exit_2(capsys, ["train", "--data", str(sharded), "--output", str(tmp_path / "r"), *argv])
    assert message in err


def test_a_pattern_outside_the_manifest_or_a_manifest_without_classes_is_refused(sharded, tmp_path, capsys):
    first = json.loads((sharded / "_info.json").read_text())["splits"]["train"]["filenames"][0]
    shutil.copy(sharded / first, tmp_path / "other-000000.tar")
    shutil.copy(sharded / "_info.json", tmp_path / "_info.json")
    err = one_line_exit_2(capsys, ["eval", "--data", str(tmp_path / "other-{000000..000000}.tar"), "--checkpoint",
                                   "x.pt"])
    assert "other-000000.tar is not in the manifest" in err
    info = json.loads((sharded / "_info.json").read_text())
    del info["class_names"]
    (tmp_path / "_info.json").write_text(json.dumps(info))
    err = one_line_exit_2(capsys, ["eval", "--data", str(tmp_path), "--checkpoint", "x.pt"])
    assert "class_names" in err
    info["class_names"], info["splits"]["train"]["filenames"][0] = ["a", "b", "c"], "../../etc/passwd"
    (tmp_path / "_info.json").write_text(json.dumps(info))
    err = one_line_exit_2(capsys, ["eval", "--data", str(tmp_path), "--checkpoint", "x.pt"])
    assert "plain names" in err


def test_the_manifest_records_class_counts_and_class_weights_auto_reads_them(sharded, tmp_path, capsys):
    info = json.loads((sharded / "_info.json").read_text())
    assert info["splits"]["train"]["class_counts"] == [20, 20, 20]
    assert info["splits"]["validation"]["class_counts"] == [10, 10, 10]
    assert train(sharded, tmp_path / "run", "--class-weights", "auto", "--max-steps", "1") == 0
    assert "class weights (auto): astronaut 1" in capsys.readouterr().out
    assert torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["global_step"] == 1


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_shards_from_other_writers_read_their_keys_and_an_oversize_member_is_skipped_unread(tmp_path, monkeypatch,
                                                                                            tar_format):
    long_key = "n01440764/" + "x" * (40 if tar_format == tarfile.USTAR_FORMAT else 140)  # past ustar's 100 bytes
    path = tmp_path / "other.tar"
    with tarfile.open(path, "w", format=tar_format) as tar:
        tar.add(tmp_path, arcname="a-folder", recursive=False)  # not a file: passed over
        for key, image, label in ((long_key, b"\xff\xd8 jpeg bytes", b"2"), ("big", b"y" * 5000, b"1"),
                                  ("nolabel", b"\xff\xd8", None)):
            for extension, data in (("jpg", image), ("cls", label)):
                if data is not None:
                    shards._member(tar, f"{key}.{extension}", data)
    monkeypatch.setattr(shard_source, "MAX_SAMPLE_BYTES", 4096)
    samples = list(shard_source.read_shard(str(path), 3))
    assert [(s.key, s.image, s.label) for s in samples] == [
        (long_key.rsplit("/", 1)[1], b"\xff\xd8 jpeg bytes", 2), ("big", None, 1), ("nolabel", b"\xff\xd8", None)]
    assert "larger than 4096" in samples[1].problem and "no class label" in samples[2].problem
    whole = path.read_bytes()
    for cut in (5 * 512 + 100, 4 * 512):  # inside a member, and between two members
        path.write_bytes(whole[:cut])
        with pytest.raises(shard_source.READ_ERRORS, match="ends"):
            list(shard_source.read_shard(str(path), 3))


def test_a_model_that_lacks_the_shards_classes_is_refused_in_one_line(sharded, trained, tmp_path, capsys):
    err = one_line_exit_2(capsys, ["eval", "--data", str(sharded), "--checkpoint", str(trained), "--workers", "0"])
    assert "the shard manifest has classes the model does not know: astronaut, chelsea, coffee" in err
    unnamed = tmp_path / "unnamed.pt"
    save_model(MobileNetV2(num_classes=2, width_mult=0.25), unnamed)
    err = one_line_exit_2(capsys, ["eval", "--data", str(sharded), "--checkpoint", str(unnamed), "--workers", "0"])
    assert "the shard manifest has 3 classes, the model 2" in err
