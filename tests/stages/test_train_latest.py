"""What a user reaches a training through: `<campaign>/train/latest.json` (the newest finished checkpoint, taken by
predict/eval as `--checkpoint CAMPAIGN`, shown by `fmbseg status`) and the run's one progress display (a few lines
with the final step count when stderr is not a terminal)."""

import io
import json
import os
import re

import pytest

from fmbseg.testing.world import write_world
from stages.latest_checkpoint import LATEST, read_latest, resolve_checkpoint, write_latest
from stages.progress import StepProgress
from stages.train import TrainConfig, train_alignment

SMALL = dict(train_size=56, device="cpu", cache_features=False)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, label_world):
    base = tmp_path_factory.mktemp("latest")
    write_world(base / "world", 6, seed=11, sizes=((240, 320), (301, 200)))
    return label_world(base / "world", base / "camp", shard_size=4)


def _cli(*args: str) -> int:
    from flows.cli import main

    return main(list(args))


def test_latest_names_the_newest_training_and_predict_eval_status_use_it(campaign, tmp_path, capsys):
    camp = str(campaign)
    with pytest.raises(FileNotFoundError, match="no train/latest.json"):
        resolve_checkpoint(camp)
    first = train_alignment(camp, TrainConfig(epochs=1, **SMALL), progress=False)
    assert resolve_checkpoint(camp) == first
    second = train_alignment(camp, TrainConfig(epochs=2, **SMALL), progress=False)
    assert second != first and os.path.isfile(first)            # the older checkpoint is kept
    with open(os.path.join(camp, "train", "latest.json")) as f:
        pointer = json.load(f)
    # relative to the campaign, so a moved campaign still resolves
    assert pointer["checkpoint"] == os.path.relpath(second, camp).replace(os.sep, "/")
    assert pointer["epochs"] == 2 and pointer["train_hash"] == os.path.basename(os.path.dirname(second))
    for ref in (camp, camp + "/", os.path.join(camp, "train", "latest"), os.path.join(camp, "train", "latest.json")):
        assert resolve_checkpoint(ref) == second, ref
    assert resolve_checkpoint(first) == first                   # a model.pt path is taken as it is
    err = capsys.readouterr().err
    assert f"--checkpoint {camp}" in err

    # rerunning the first config reuses its checkpoint and makes it the latest again
    assert train_alignment(camp, TrainConfig(epochs=1, **SMALL), progress=False) == first
    assert read_latest(camp) == first

    # the CLI: predict with --checkpoint CAMPAIGN, eval with .../train/latest, status lists the pointer
    world = os.path.join(os.path.dirname(camp), "world")
    out = tmp_path / "pred"
    assert _cli("predict", "--checkpoint", camp, "--images", os.path.join(world, "images"), "--vocab",
                os.path.join(world, "classes.txt"), "--out", str(out), "--device", "cpu", "--no-progress") == 0
    assert f"checkpoint: {first}" in capsys.readouterr().err
    assert len([p for p in os.listdir(out) if p.endswith(".png")]) == 6
    assert _cli("eval", "--dataset", "custom", "--data-root", world, "--models", "fmbseg", "--checkpoint",
                os.path.join(camp, "train", "latest"), "--out", str(tmp_path / "report"), "--device", "cpu",
                "--no-progress") == 0
    with open(tmp_path / "report" / "results.json") as f:
        assert "fmbseg" in next(iter(json.load(f)["results"].values()))
    assert _cli("status", "--campaign", camp) == 0
    status = capsys.readouterr().out
    assert re.search(r"latest\s+train/latest.json -> " + re.escape(os.path.relpath(first, camp)), status)


def test_latest_outside_the_campaign_and_on_an_object_store(tmp_path):
    camp = tmp_path / "camp"
    camp.mkdir()
    elsewhere = str(tmp_path / "models" / "m.pt")
    write_latest(str(camp), elsewhere, "abc", 3)
    assert read_latest(str(camp)) == elsewhere                  # `train --out` outside: the full path is kept
    url = "memory://latest-test/camp"
    write_latest(url, url + "/train/h1/model.pt", "h1", 10)
    from storage.fs import CampaignRoot

    assert CampaignRoot(url).read_json(LATEST)["checkpoint"] == "train/h1/model.pt"
    assert read_latest(url) == "memory:///latest-test/camp/train/h1/model.pt"


def test_cli_refuses_a_campaign_without_a_training(tmp_path, capsys):
    camp = tmp_path / "c"
    camp.mkdir()
    (camp / "campaign.json").write_text("{}")
    assert _cli("predict", "--checkpoint", str(camp), "--images", str(tmp_path), "--vocab", "cat,dog",
                "--out", str(tmp_path / "o")) == 2
    assert "no finished `fmbseg train`" in capsys.readouterr().err


def test_progress_off_a_terminal_is_a_few_lines_ending_with_the_step_count(campaign, capsys):
    train_alignment(str(campaign), TrainConfig(epochs=9, **SMALL), out=str(campaign / "p.pt"), progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: step ")]
    total = 9 * 2                                               # 6 images at batch 5: 2 steps per epoch
    assert 3 <= len(lines) <= 11, lines
    assert lines[-1].startswith(f"train: step {total}/{total} (100%)") and "epoch 9/9 loss" in lines[-1]
    assert all("left" in line for line in lines[:-1]) and "\r" not in "".join(lines)

    stream = io.StringIO()
    bar = StepProgress(1000, "x", file=stream, lines=4)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    bar.close()
    assert [line.split(",")[0] for line in stream.getvalue().splitlines()] == [
        "x: step 250/1000 (25%)", "x: step 500/1000 (50%)", "x: step 750/1000 (75%)", "x: step 1000/1000 (100%)"]
    quiet = io.StringIO()
    off = StepProgress(10, "x", enabled=False, file=quiet)
    off.update(10)
    off.close()
    assert quiet.getvalue() == ""


def test_latest_of_a_relative_out_outside_the_campaign_names_that_file(tmp_path, monkeypatch):
    """`fmbseg train --campaign c --out elsewhere/model.pt`: the pointer reaches elsewhere/model.pt (from any
    working directory), not c/elsewhere/model.pt."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "campaign.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    write_latest("c", os.path.join("elsewhere", "model.pt"), "h", 3)
    monkeypatch.chdir("/")
    assert read_latest(str(tmp_path / "c")) == str(tmp_path / "elsewhere" / "model.pt")
