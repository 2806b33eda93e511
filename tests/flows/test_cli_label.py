"""`fmbseg label` / `fmbseg status`: two worker processes equal one run; bad arguments exit 2 with one line."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fmbseg.testing.world import write_world
from flows.cli import main
from storage.reader import CampaignReader

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    write_world(base / "w", 7, seed=21, sizes=((200, 260), (240, 180), (160, 300)), formats=("png", "jpg"))
    return base


@pytest.fixture(scope="module")
def single(world):
    """One in-process run over the whole world (the tests below only read it or are refused)."""
    assert main(label_args(world, world / "single")) == 0
    return world / "single"


def label_args(world, campaign, *extra):
    return ["label", "--images", str(world / "w" / "images"), "--vocab", str(world / "w" / "classes.txt"),
            "--campaign", str(campaign), "--preset", "oracle", "--device", "cpu", "--shard-size", "2",
            "--seed", "3", "--no-progress", *extra]


def rows(campaign):
    r = CampaignReader(campaign)
    images = sorted(r.images().to_pylist(), key=lambda x: x["image_id"])
    masks = sorted(r.masks().to_pylist(), key=lambda x: (x["image_id"], x["mask_id"]))
    labels = {i: lab for i, _, lab in r.iter_labels()}
    return images, masks, labels


def test_two_ranks_in_two_processes_equal_one_run(world, single, tmp_path):
    # Same intra-op thread count as this process: float reductions (mask pooling) round differently with
    # another thread count, at the 1e-7 level; the claim under test is about the split into workers.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))
    procs = [
        subprocess.Popen([sys.executable, "-m", "flows.cli", *label_args(world, tmp_path / "pair"), "--rank", str(r),
                          "--world-size", "2"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    assert "rank 0 of 2" in outs[0][0] and "rank 1 of 2" in outs[1][0]
    assert "shards     2 for this worker" in outs[0][0]  # shards 0 and 2 of 0..3
    single_dir, (single, pair) = single, (rows(single), rows(tmp_path / "pair"))
    assert pair[0] == single[0]
    assert len(pair[1]) == len(single[1]) > 0 and pair[1] == single[1]
    assert pair[2].keys() == single[2].keys()
    for k in single[2]:
        np.testing.assert_array_equal(pair[2][k], single[2][k])
    assert (tmp_path / "pair" / "campaign.json").read_bytes() == (single_dir / "campaign.json").read_bytes()


def test_status_and_rerun_exit_zero(world, single, capsys):
    assert main(label_args(world, single)) == 0  # everything done: skipped
    assert "0 labelled, 4 already done" in capsys.readouterr().out
    assert main(["status", "--campaign", str(single)]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "shards    4/4 done" in out and "7/7 labelled: 7 ok, 0 failed" in out and "in label maps" in out


def test_status_lists_checkpoints_and_reports(world, single, tmp_path, capsys):
    import shutil

    camp = tmp_path / "camp"
    shutil.copytree(single, camp)
    (camp / "train" / "abc123").mkdir(parents=True)
    (camp / "train" / "abc123" / "model.pt").write_bytes(b"x")
    (camp / "train" / "unfinished").mkdir()                      # no model.pt: not listed
    (camp / "eval" / "abc123").mkdir(parents=True)
    (camp / "eval" / "abc123" / "results.md").write_text("| |")
    (camp / "stats").mkdir()
    (camp / "stats" / "stats.md").write_text("#")
    assert main(["status", "--campaign", str(camp)]) == 0
    out = capsys.readouterr().out
    assert "checkpoints train/abc123/model.pt\n" in out
    assert "reports   eval/abc123/results.md, stats/stats.md\n" in out


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda a, t: a.__setitem__(2, str(t / "missing")), "image folder not found"),
        (lambda a, t: a.extend(["--rank", "2", "--world-size", "2"]), "--rank must be in 0..1"),
        (lambda a, t: a.extend(["--shard-size", "0"]), "--shard-size must be >= 1"),
        (lambda a, t: a.__setitem__(a.index("oracle"), "nope"), "unknown preset 'nope'"),
        (lambda a, t: a.__setitem__(4, str(t / "vocab.txt")), "vocabulary file not found"),
        (lambda a, t: a.extend(["--image-root", str(t)]), "--image-root only applies"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(world, tmp_path, capsys, mutate, needle):
    args = label_args(world, tmp_path / "c")
    mutate(args, tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "c" / "shards").exists()  # nothing planned


def test_changed_config_refused_and_missing_campaign(world, single, tmp_path, capsys):
    args = label_args(world, single)
    args[args.index("--seed") + 1] = "4"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "seed: 3 -> 4" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert main(["status", "--campaign", str(tmp_path / "nothing")]) == 2
    assert "no campaign at" in capsys.readouterr().err


def test_dense_mode_flag(world, single, tmp_path, capsys):
    import json

    from fmbseg.models.clip import DENSE_MODES

    # A new mode is a changed Stage-1 config for an existing campaign: refused, naming the field.
    assert main(label_args(world, single, "--dense-mode", "sclip")) == 2
    err = capsys.readouterr().err.strip()
    assert "stage1.dense_mode" in err and "sclip" in err and len(err.splitlines()) == 1
    # The default flag value is the campaign's existing (default) config: nothing to relabel.
    assert main(label_args(world, single, "--dense-mode", "maskclip")) == 0
    assert "already done" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(label_args(world, tmp_path / "c", "--dense-mode", "gem"))
    assert e.value.code == 2 and "invalid choice: 'gem'" in capsys.readouterr().err
    # The flag's choices are the library's modes (not given: the preset's, maskclip); a chosen mode is recorded in
    # campaign.json.
    from flows.cli import build_parser

    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["label"]._actions
                  if a.dest == "dense_mode")
    assert tuple(action.choices) == DENSE_MODES and action.default is None and "default maskclip" in action.help
    one = tmp_path / "one"
    one.mkdir()
    first = sorted((world / "w" / "images").iterdir())[0]
    (one / first.name).write_bytes(first.read_bytes())
    args = label_args(world, tmp_path / "camp", "--dense-mode", "clearclip")
    args[args.index("--images") + 1] = str(one)
    assert main(args) == 0
    assert json.loads((tmp_path / "camp" / "campaign.json").read_text())["stage1"]["dense_mode"] == "clearclip"
