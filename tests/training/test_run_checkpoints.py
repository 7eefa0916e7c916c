"""Training checkpoints: plain data with the full state, and resuming gives the same weights."""


import pytest
import torch


from conftest import MS_CHECKPOINT, assert_same_weights, records, train


def test_training_checkpoint_is_plain_data_with_full_state(dataset, tmp_path):
    run = tmp_path / "run"
    assert train(dataset, run, "--epochs", "1", "--ema", "0.9") == 0
    payload = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "train_model", "optimizer", "scaler", "rng", "epoch", "global_step", "config", "preprocess"} <= set(payload)
    assert payload["epoch"] == 1 and payload["global_step"] == 3


def test_resume_gives_identical_weights(dataset, tmp_path):
    common = ["--epochs", "3", "--ema", "0.5", "--seed", "7"]
    assert train(dataset, tmp_path / "straight", *common) == 0
    assert train(dataset, tmp_path / "split", *common, "--max-steps", "3") == 0
    assert torch.load(tmp_path / "split/checkpoints/last.pt", weights_only=True)["epoch"] == 1
    assert train(dataset, tmp_path / "split", *common, "--resume", "auto") == 0
    assert_same_weights(tmp_path / "straight", tmp_path / "split")
    assert records(tmp_path / "split", "step")[-1]["global_step"] == 8
    assert [r["global_step"] for r in records(tmp_path / "split", "step")] == list(range(9))


@pytest.mark.parametrize("kind", ["images", "in-memory", "cached-features", "device-decoded"])
def test_mid_epoch_resume_gives_identical_weights(dataset, tmp_path, kind):
    extra = {"images": [], "in-memory": ["--in-memory"], "device-decoded": ["--data-backend", "device"],
             "cached-features": ["--pretrained", str(MS_CHECKPOINT), "--freeze", "backbone", "--width-mult", "0.5"]}[kind]
    common = ["--epochs", "2", "--ema", "0.5", "--seed", "3", "--dropout", "0.2", *extra]  # 3 steps per epoch
    assert train(dataset, tmp_path / "straight", *common) == 0
    assert train(dataset, tmp_path / "split", *common, "--max-steps", "4") == 0  # stops inside the second epoch
    stopped = torch.load(tmp_path / "split/checkpoints/last.pt", weights_only=True)
    assert (stopped["epoch"], stopped["global_step"]) == (1, 4)
    assert train(dataset, tmp_path / "split", *common, "--resume", "auto") == 0
    straight = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)
    split = torch.load(tmp_path / "split/checkpoints/last.pt", weights_only=True)
    assert split["global_step"] == straight["global_step"] == 6
    for part in ("model", "train_model"):
        different = [key for key, value in straight[part].items() if not torch.equal(value, split[part][key])]
        assert different == [], (part, different[:3])
    assert [r["global_step"] for r in records(tmp_path / "split", "step")] == list(range(6))
