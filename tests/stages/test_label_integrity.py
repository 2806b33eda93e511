"""`fmbseg label` end to end under the integrity faults of issue 13: two label processes on one shard, kill -9
after the commit, a read-only campaign, `--overwrite` with other images and another vocabulary, moved images
(`--relocate`), COCO names that leave the image root, a run where every image failed. Oracle preset, tiny world."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fmbseg.testing.world import write_world
from stages.label import LabelConfig, campaign_status, format_status, label_shard, plan_campaign, run_label
from storage.reader import CampaignReader, ImageChanged
from storage.verify import verify_campaign

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
REPO = Path(__file__).resolve().parents[2]


def cfg(images, campaign, vocab, **over) -> LabelConfig:
    return LabelConfig(**{**dict(images=str(images), vocab=str(vocab), campaign=str(campaign), preset="oracle",
                                 shard_size=8, device="cpu"), **over})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("integrity")
    write_world(base / "world", 2, seed=3, sizes=[(64, 80)])
    run_label(cfg(base / "world" / "images", base / "reference", base / "world" / "classes.txt"), progress=False)
    return base


def sorted_masks(campaign) -> pd.DataFrame:
    t = CampaignReader(campaign).masks().to_pandas().drop(columns=["rle", "bbox"])
    return t.sort_values(["image_id", "mask_id"]).reset_index(drop=True)


def label_cli(world: Path, campaign: Path, fault_dir: Path, **faults) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               FMBSEG_FAULT_DIR=str(fault_dir), **{f"FMBSEG_FAULT_{k.upper()}": v for k, v in faults.items()})
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "label", "--images", str(world / "world" / "images"),
                             "--vocab", str(world / "world" / "classes.txt"), "--campaign", str(campaign),
                             "--preset", "oracle", "--device", "cpu", "--shard-size", "8", "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_clean_and_equal(campaign: Path, reference: Path) -> None:
    assert verify_campaign(str(campaign), attempts_grace_s=0)["problems"] == []
    assert not any((campaign / "_attempts").rglob("*.parquet"))
    assert sorted(p.name for p in (campaign / "done").iterdir()) == ["000000.json"]
    assert [p.name for p in (campaign / "masks" / "shard=000000").iterdir()] == ["part-0.parquet"]
    pd.testing.assert_frame_equal(sorted_masks(campaign), sorted_masks(reference))
    assert pd.read_parquet(campaign / "masks").shape[0] == pd.read_parquet(reference / "masks").shape[0]


def test_two_label_processes_on_one_shard_and_kill_after_commit(world, tmp_path):
    """The duplicate worker of issue 13.1: worker A passed its done check, worker B labels and commits the shard,
    then A goes on: A's commit loses and B's shard stays whole. Then a worker killed right after its marker:
    the rerun rolls its publish forward."""
    faults = tmp_path / "faults"
    faults.mkdir()
    # All three start at once (A waits at its point whatever the timing); the doomed one uses another campaign.
    a = label_cli(world, tmp_path / "c", faults, pause="computing")
    b = label_cli(world, tmp_path / "c", tmp_path)
    doomed = label_cli(world, tmp_path / "k", tmp_path, kill="committed")
    assert b.wait(timeout=240) == 0, b.stderr.read()
    deadline = time.monotonic() + 240
    while not (faults / "computing.reached").exists():
        assert a.poll() is None and time.monotonic() < deadline, a.stderr.read() if a.poll() is not None else "slow"
        time.sleep(0.05)
    marker_b = (tmp_path / "c" / "done" / "000000.json").read_bytes()
    (faults / "computing.go").touch()
    assert a.wait(timeout=240) == 0, a.stderr.read()
    assert (tmp_path / "c" / "done" / "000000.json").read_bytes() == marker_b, "the late worker replaced the commit"
    assert_clean_and_equal(tmp_path / "c", world / "reference")

    doomed.wait(timeout=240)
    assert doomed.returncode == -9
    assert not (tmp_path / "k" / "masks").exists() or not any((tmp_path / "k" / "masks").rglob("*.parquet"))
    s = campaign_status(str(tmp_path / "k"))
    assert s["shards_done"] == 1 and "not fully published" in s["problems"][0]
    pd.testing.assert_frame_equal(sorted_masks(tmp_path / "k"), sorted_masks(world / "reference"))  # staged copy
    summary = run_label(cfg(world / "world" / "images", tmp_path / "k", world / "world" / "classes.txt"),
                        progress=False)
    assert summary["shards_skipped"] == 1
    assert_clean_and_equal(tmp_path / "k", world / "reference")
    # a committed shard whose publish cannot be finished (public part deleted, staged copy gone too) is relabelled
    attempt = json.loads((tmp_path / "k" / "done" / "000000.json").read_text())["attempt"]
    (tmp_path / "k" / "_attempts" / "000000" / attempt).mkdir(parents=True)
    (tmp_path / "k" / "masks" / "shard=000000" / "part-0.parquet").unlink()
    summary = run_label(cfg(world / "world" / "images", tmp_path / "k", world / "world" / "classes.txt"),
                        progress=False)
    assert summary["shards_labelled"] == 1
    assert_clean_and_equal(tmp_path / "k", world / "reference")


def test_read_only_campaign_fails_before_compute(world, tmp_path, monkeypatch):
    import stages.label
    from storage.fs import CampaignNotWritable

    c = cfg(world / "world" / "images", tmp_path / "ro", world / "world" / "classes.txt")
    plan_campaign(c)
    ro = tmp_path / "ro-mount"
    ro.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        f"mount --bind {tmp_path / 'ro'} {ro} && mount -o remount,bind,ro {ro}", shell=True,
        capture_output=True).returncode == 0
    if not mounted:  # not root: the same OSError a read-only mount raises
        import errno

        from storage.fs import CampaignRoot

        def refuse(self, rel, data):
            raise OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr(CampaignRoot, "write_private", refuse)
        ro = tmp_path / "ro"
    import fmbseg.stage1

    monkeypatch.setattr(fmbseg.stage1, "run_stage1", lambda *a, **k: pytest.fail("computed on a read-only campaign"))
    try:
        with pytest.raises(CampaignNotWritable, match=r"^campaign .* is not writable \(Read-only file system\)"):
            label_shard(str(ro), 0, "cpu")
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=True)


def test_overwrite_with_other_images_and_vocabulary_equals_a_fresh_campaign(world, tmp_path):
    other = tmp_path / "other"
    write_world(other, 3, seed=9, sizes=[(64, 80)])
    vocab = "red,green,blue,yellow"
    shutil.copytree(world / "reference", tmp_path / "c")
    run_label(cfg(other / "images", tmp_path / "c", vocab, overwrite=True, shard_size=2), progress=False)
    run_label(cfg(other / "images", tmp_path / "fresh", vocab, shard_size=2), progress=False)
    pd.testing.assert_frame_equal(sorted_masks(tmp_path / "c"), sorted_masks(tmp_path / "fresh"))
    for sub in ("shards", "done"):
        assert sorted(p.name for p in (tmp_path / "c" / sub).iterdir()) == \
            sorted(p.name for p in (tmp_path / "fresh" / sub).iterdir())
    for sid in (0, 1):
        assert json.loads((tmp_path / "c" / "shards" / f"{sid:06d}.json").read_text()) == \
            json.loads((tmp_path / "fresh" / "shards" / f"{sid:06d}.json").read_text())
    # raw readers: only parts of the new vocabulary, no row of the old images
    parts = sorted((tmp_path / "c" / "masks").rglob("*.parquet"))
    assert {pq.read_schema(p).metadata[b"vocabulary"] for p in parts} == {json.dumps(vocab.split(",")).encode()}
    raw = pd.read_parquet(tmp_path / "c" / "images")
    assert sorted(raw.image_id) == sorted(p.name for p in (other / "images").iterdir())


def test_relocate_moved_images_and_train_checks_image_size(world, tmp_path, capsys):
    from flows.cli import main

    shutil.copytree(world / "world" / "images", tmp_path / "old")
    run_label(cfg(tmp_path / "old", tmp_path / "c", world / "world" / "classes.txt"), progress=False)
    shutil.move(tmp_path / "old", tmp_path / "new")
    with pytest.raises(ImageChanged, match="--relocate"):
        list(CampaignReader(tmp_path / "c").iter_labels(check_images=True))
    # a rerun naming the new folder is refused with the way out
    with pytest.raises(ValueError, match="--relocate NEW_ROOT"):
        plan_campaign(cfg(tmp_path / "new", tmp_path / "c", world / "world" / "classes.txt"))
    victim = sorted((tmp_path / "new").iterdir())[0]
    keep = victim.read_bytes()
    victim.write_bytes(keep + b"\0")
    assert main(["label", "--campaign", str(tmp_path / "c"), "--relocate", str(tmp_path / "new")]) != 0
    want = f"1 of 2 images do not match (first: {victim.name}: {victim} has {len(keep) + 1} bytes, {len(keep)} were"
    assert want + " planned)" in capsys.readouterr().err
    victim.write_bytes(keep)
    assert main(["label", "--campaign", str(tmp_path / "c"), "--relocate", str(tmp_path / "new")]) == 0
    reader = CampaignReader(tmp_path / "c")
    got = list(reader.iter_labels(check_images=True))
    assert {Path(p).parent for _, p, _ in got} == {tmp_path / "new"}
    summary = run_label(cfg(tmp_path / "new", tmp_path / "c", world / "world" / "classes.txt"), progress=False)
    assert summary["shards_skipped"] == 1
    # a rotated replacement of the same name: train must not use the old label map with it
    img = Image.open(victim)
    img.transpose(Image.Transpose.ROTATE_90).save(victim, format=img.format)
    with pytest.raises(ImageChanged, match=r"is 80x64 \(HxW\) but was labelled at 64x80"):
        list(CampaignReader(tmp_path / "c").iter_labels(check_images=True))


def test_coco_names_outside_the_image_root_are_refused_per_image(world, tmp_path):
    from flows.cli import main

    root = tmp_path / "coco"
    root.mkdir()
    src = sorted((world / "world" / "images").iterdir())
    shutil.copy(src[0], root / "inside.png")
    shutil.copy(src[1], tmp_path / "outside.png")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"TOPSECRET token=hunter2\n")
    (root / "notes.png").write_bytes(b"TOPSECRET inside the root\n")  # read (inside), fails, content not quoted
    os.symlink(secret, root / "link.png")
    coco = {"images": [{"id": 1, "file_name": "inside.png"}, {"id": 2, "file_name": "../outside.png"},
                       {"id": 3, "file_name": str(secret)}, {"id": 4, "file_name": "link.png"},
                       {"id": 5, "file_name": "notes.png"}]}
    (root / "ann.json").write_text(json.dumps(coco))
    vocab = str(world / "world" / "classes.txt")
    run_label(cfg(root / "ann.json", tmp_path / "c", vocab), progress=False)  # image root: the JSON's folder
    rows = {r["image_id"]: r for r in CampaignReader(tmp_path / "c").images().to_pylist()}
    assert [rows[i]["status"] for i in "12345"] == ["ok", "failed", "failed", "failed", "failed"]
    assert rows["5"]["error"].startswith("not an image: ")
    assert "leaves the image root" in rows["2"]["error"] and "leaves the image root" in rows["3"]["error"]
    assert "symbolic link" in rows["4"]["error"] and "--allow-outside-root" in rows["4"]["error"]
    assert not any("TOPSECRET" in (r["error"] or "") or "hunter2" in (r["error"] or "") for r in rows.values())
    assert campaign_status(str(tmp_path / "c"))["failure_reasons"] == {"outside image root": 3, "not an image": 1}
    assert "outside image root x3" in format_status(campaign_status(str(tmp_path / "c")))
    # opting out reads the image outside the root
    run_label(cfg(root / "ann.json", tmp_path / "open", vocab, allow_outside_root=True), progress=False)
    rows = {r["image_id"]: r for r in CampaignReader(tmp_path / "open").images().to_pylist()}
    assert rows["2"]["status"] == "ok" and rows["3"]["status"] == "failed" and "refused" not in rows["3"]["error"]
    # a run where every image failed exits non-zero
    (root / "bad.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "../outside.png"}]}))
    assert main(["label", "--images", str(root / "bad.json"), "--vocab", vocab, "--campaign", str(tmp_path / "b"),
                 "--preset", "oracle", "--device", "cpu", "--no-progress"]) == 1


def test_lost_shard_list_does_not_block_the_campaign(world, tmp_path, capsys):
    """A lost list of a shard that never committed: the rest of the campaign is labelled, nothing is planned twice,
    the run names the repair and exits 1; after `verify --repair` the next run plans the images once."""
    from flows.cli import main

    args = ["label", "--images", str(world / "world" / "images"), "--vocab", str(world / "world" / "classes.txt"),
            "--campaign", str(tmp_path / "c"), "--preset", "oracle", "--device", "cpu", "--shard-size", "1",
            "--no-progress"]
    plan_campaign(cfg(world / "world" / "images", tmp_path / "c", world / "world" / "classes.txt", shard_size=1))
    label_shard(str(tmp_path / "c"), 1, "cpu")
    (tmp_path / "c" / "shards" / "000000.json").unlink()  # shard 0 never committed: its list cannot be rebuilt
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "shards/000000.json is missing" in out and "verify --campaign" in out
    assert sorted(p.name for p in (tmp_path / "c" / "shards").iterdir()) == ["000001.json"]
    assert main(["verify", "--campaign", str(tmp_path / "c"), "--repair"]) == 0
    assert main(args) == 0
    ids = pd.read_parquet(tmp_path / "c" / "images").image_id
    assert sorted(ids) == sorted(p.name for p in (world / "world" / "images").iterdir())  # each exactly once
    assert verify_campaign(str(tmp_path / "c"), attempts_grace_s=0)["problems"] == []
