"""Stage-2 training on an oracle campaign: resume after an interruption ends with the uninterrupted run's weights,
the self-describing checkpoint and its config file, the hash-named output folder, and the feature cache."""

import json
import os

import numpy as np
import pytest
import torch

from fmbseg.alignment import train_view
from fmbseg.checkpoint import load_checkpoint
from fmbseg.images import load_image
from fmbseg.testing.oracle import build_oracle_dino
from fmbseg.testing.world import write_world
from stages.train import (TrainConfig, auto_epochs, checkpoint_every, config_path_for, train_alignment,
                          train_hash)
from storage.reader import CampaignReader

# 4x4 patches per image: fast, still every code path; the cache is explicit here (its default, auto, is tested below)
SMALL = dict(epochs=3, train_size=56, device="cpu", cache_features=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, label_world):
    base = tmp_path_factory.mktemp("train")
    write_world(base / "world", 7, seed=5, sizes=((240, 320), (301, 200)))
    return label_world(base / "world", base / "camp", shard_size=4)


class Interrupt(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_weights(campaign, tmp_path, capsys):
    cfg = TrainConfig(**SMALL)
    full = train_alignment(str(campaign), cfg, out=str(tmp_path / "full.pt"), progress=False)

    def stop_after_first(epoch, path, stats):
        if epoch == 1:
            raise Interrupt

    part = str(tmp_path / "part.pt")
    with pytest.raises(Interrupt):
        train_alignment(str(campaign), cfg, out=part, on_epoch_end=stop_after_first, progress=False)
    assert load_checkpoint(part)["epoch"] == 1
    capsys.readouterr()
    finished = []
    train_alignment(str(campaign), cfg, out=part, on_epoch_end=lambda e, p, s: finished.append(e), progress=False)
    assert "resuming" in capsys.readouterr().err and finished == [2, 3]

    a, b = load_checkpoint(full), load_checkpoint(part)
    assert a["epoch"] == b["epoch"] == 3
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # momentum buffers too: the optimiser state was restored, not rebuilt
    for sa, sb in zip(a["resume"]["optimizer"]["state"].values(), b["resume"]["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])

    # a finished checkpoint with the same settings is reused, not retrained
    mtime = os.path.getmtime(part)
    assert train_alignment(str(campaign), cfg, out=part, progress=False) == part
    assert os.path.getmtime(part) == mtime
    # another setting into the same file is refused
    with pytest.raises(ValueError, match="training with other settings"):
        train_alignment(str(campaign), TrainConfig(**{**SMALL, "epochs": 4}), out=part, progress=False)


def test_checkpoint_describes_itself_and_lands_in_the_hash_folder(campaign):
    cfg = TrainConfig(**{**SMALL, "epochs": 1})
    reader = CampaignReader(str(campaign))
    path = train_alignment(str(campaign), cfg, progress=False)
    thash = train_hash(cfg, reader.stage1_hash)
    assert path == os.path.join(str(campaign), "train", thash, "model.pt")
    # the hash ignores the device, follows every weight-changing setting and the campaign's Stage-1 config
    assert train_hash(TrainConfig(**{**SMALL, "epochs": 1, "device": "cuda"}), reader.stage1_hash) == thash
    assert train_hash(TrainConfig(**{**SMALL, "epochs": 1, "lr": 0.05}), reader.stage1_hash) != thash
    assert train_hash(cfg, "another-stage1-hash") != thash

    ck = load_checkpoint(path)
    assert ck["vocabulary"]["names"] == reader.vocabulary
    assert ck["encoders"] == {"dino": {"model_id": "oracle-dino", "weights_sha256": None},
                              "clip": {"model_id": "oracle-clip", "weights_sha256": None}, "preset": "oracle"}
    assert ck["temperature"] == 0.1 and ck["epoch"] == 1 and ck["version"]
    assert ck["config"]["alignment"] == {"in_dim": 64, "out_dim": 32, "num_heads": 1, "mlp_ratio": 4.0}
    assert ck["config"]["train"]["batch_size"] == 5 and ck["config"]["stage1_hash"] == reader.stage1_hash
    assert ck["plan"]["epochs"] == 1 and ck["plan"]["epochs_setting"] == 1 and ck["plan"]["total_steps"] == 2
    assert ck["plan"]["cache_features"] is False and ck["plan"]["estimated_seconds"] >= 0
    assert ck["text"].shape == (12, 32)
    with open(config_path_for(path)) as f:
        resolved = json.load(f)
    assert resolved["train_hash"] == thash and resolved["train"]["lr"] == 0.1 and resolved["images"] == 7
    assert resolved["plan"] == ck["plan"]
    # cached features are fp16: a cached run is another training, with another hash
    assert train_hash(TrainConfig(**{**SMALL, "epochs": 1, "cache_features": True}), reader.stage1_hash) != thash
    with pytest.raises(ValueError, match="before hashing"):
        train_hash(TrainConfig(epochs="auto"), reader.stage1_hash)


def test_feature_cache_holds_the_recomputed_features(campaign, tmp_path, capsys):
    cfg = TrainConfig(**{**SMALL, "epochs": 2, "cache_features": True})
    import shutil

    shutil.rmtree(campaign / "features", ignore_errors=True)      # another test's auto-cached run may have made it
    train_alignment(str(campaign), cfg, out=str(tmp_path / "c.pt"), progress=False)
    err = capsys.readouterr().err
    assert "writing feature cache" in err and "7 images x 4x4x64 fp16 = 0.0 MiB" in err
    # 7 images in batches of 5 for 2 epochs: 4 steps, and the user is told that is far too few
    assert "warning: only 4 SGD steps (7 images, batch 5, 2 epochs)" in err
    assert "epoch 2/2" in err and "features from cache" in err.split("epoch 2/2")[1]
    import zarr

    (cache_dir,) = [d for d in os.listdir(campaign / "features") if d.endswith(".zarr")]
    group = zarr.open_group(str(campaign / "features" / cache_dir), mode="r")
    assert group.attrs["complete"] is True
    feats = group["features"]
    assert feats.shape == (7, 4, 4, 64) and feats.dtype == np.float16
    assert os.path.getsize(campaign / "features" / cache_dir / "features" / "c" / "0" / "0" / "0" / "0") == 4 * 4 * 64 * 2
    dino = build_oracle_dino("cpu")
    for i, (_, path, _) in enumerate(CampaignReader(str(campaign)).iter_labels()):
        x, _ = train_view(load_image(path), None, 56)
        want = dino.features(x[None])[0].half().numpy()
        assert np.array_equal(feats[i], want), i
    # a second cached run reads the finished cache from its first epoch and trains the same weights
    train_alignment(str(campaign), cfg, out=str(tmp_path / "d.pt"), progress=False)
    assert "writing feature cache" not in capsys.readouterr().err
    a, b = load_checkpoint(str(tmp_path / "c.pt")), load_checkpoint(str(tmp_path / "d.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_bad_inputs(tmp_path, campaign):
    with pytest.raises(FileNotFoundError, match="campaign.json missing"):
        train_alignment(str(tmp_path / "nothing"), TrainConfig(**SMALL))
    with pytest.raises(ValueError, match="epochs must be an integer >= 1 or auto"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="cache_features must be true, false or auto"):
        TrainConfig(cache_features="yes")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=r"crop_min must be a number in \(0, 1\]"):
            TrainConfig(crop_min=bad)
    with pytest.raises(ValueError, match="not a multiple of the DINOv2 patch size 14"):
        train_alignment(str(campaign), TrainConfig(**{**SMALL, "train_size": 50}), out=str(tmp_path / "x.pt"))


def test_auto_epochs_resolve_print_the_plan_and_are_recorded(campaign, tmp_path, capsys):
    # 7 images at batch 5 = 2 steps per epoch: max(10, ceil(2000 / 2)) = 1000 epochs; 1000 / 50 = every 20th
    # epoch is checkpointed. The run is stopped at its first checkpoint (40 steps).
    assert (auto_epochs(7), auto_epochs(24), auto_epochs(5000), auto_epochs(1001)) == (1000, 400, 10, 10)
    assert auto_epochs(995) == 11              # 199 steps per epoch: 10 epochs would be 1990 < 2000
    assert checkpoint_every(1000) == 20 and checkpoint_every(50) == 1
    cfg = TrainConfig(train_size=56, device="cpu")                 # defaults: epochs auto, cache auto
    assert cfg.epochs == "auto" and cfg.cache_features == "auto"

    def stop_at_first_checkpoint(epoch, path, stats):
        if stats["checkpoint"]:
            raise Interrupt

    path = str(tmp_path / "auto.pt")
    with pytest.raises(Interrupt):
        train_alignment(str(campaign), cfg, out=path, on_epoch_end=stop_at_first_checkpoint, progress=False)
    err = capsys.readouterr().err
    assert "train: plan: 1000 epochs (auto: max(10, >= 2000 steps at batch 5)) x 2 steps = 2000 SGD steps; " \
           "7 images, batch 5, 56 px, random windows of 2-4 x 2-4 of the 4x4 patches, features cached" in err
    assert "estimated" in err and "warning" not in err
    assert err.index("train: plan:") < err.index("epoch 20/1000")
    ck = load_checkpoint(path)
    assert ck["epoch"] == 20 and ck["epochs"] == 1000
    assert ck["config"]["train"]["epochs"] == 1000 and ck["config"]["train"]["cache_features"] is True
    assert ck["plan"]["epochs_setting"] == "auto" and ck["plan"]["cache_setting"] == "auto"
    assert ck["plan"]["crop_min"] == 0.4 and ck["config"]["train"]["crop_min"] == 0.4
    assert (ck["plan"]["steps_per_epoch"], ck["plan"]["total_steps"], ck["plan"]["checkpoint_every"]) == (2, 2000, 20)
    assert ck["resume"]["scheduler"]["T_max"] == 2000 and ck["resume"]["scheduler"]["last_epoch"] == 40
    reader = CampaignReader(str(campaign))
    resolved = TrainConfig(epochs=1000, train_size=56, device="cpu", cache_features=True)
    assert ck["train_hash"] == train_hash(resolved, reader.stage1_hash)
    # the same request resumes it (the interrupted run chose the cache; the choice is kept)
    capsys.readouterr()
    with pytest.raises(Interrupt):
        train_alignment(str(campaign), cfg, out=path, on_epoch_end=stop_at_first_checkpoint, progress=False)
    assert "resuming" in capsys.readouterr().err and load_checkpoint(path)["epoch"] == 40
