"""Stage-1 campaigns on the synthetic world with the `oracle` preset: accuracy against the planted ground truth,
the storage contract read back with plain libraries, and the rerun semantics of DESIGN §5."""

import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from fmbseg import IGNORE_LABEL
from fmbseg.metrics import ConfusionMatrix
from fmbseg.testing.palette import NUM_COLOURS
from fmbseg.testing.world import DEFAULT_SIZES, load_annotation, write_world
from stages.label import LabelConfig, campaign_status, format_status, label_shard, plan_campaign, run_label
from storage.reader import CampaignReader
from storage.tables import decode_rle

# pycocotools 2.0.11 under numpy 2 warns on every decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# the world's default sizes: non-square both ways, 200x450 up to 450x600; PNG and JPEG alternate
SIZES = DEFAULT_SIZES


def config(world, campaign, **over):
    kw = dict(images=str(world / "images"), vocab=str(world / "classes.txt"), campaign=str(campaign),
              preset="oracle", shard_size=3, device="cpu", seed=0)
    kw.update(over)
    return LabelConfig(**kw)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    base = tmp_path_factory.mktemp("oracle")
    write_world(base / "world", 8, seed=11, sizes=SIZES, formats=("png", "jpg"))
    summary = run_label(config(base / "world", base / "camp"), progress=False)
    assert (summary["images"], summary["ok"], summary["failed"], summary["shards_labelled"]) == (8, 8, 0, 3)
    return base


def stage_map(rows, stage, shape):
    """A label map painted from one stage's masks only, in increasing score order (as the merge paints)."""
    lab = np.full(shape, IGNORE_LABEL, np.uint16)
    for m in sorted((m for m in rows if m["stage"] == stage), key=lambda m: m["score"]):
        lab[decode_rle(m["rle"], m["height"], m["width"])] = m["class_id"]
    return lab


def test_oracle_campaign_recovers_planted_labels(campaign):
    reader = CampaignReader(campaign / "camp")
    by_image = {}
    for m in reader.masks().to_pylist():
        by_image.setdefault(m["image_id"], []).append(m)
    scores = {k: ConfusionMatrix(NUM_COLOURS) for k in ("merged", "1.1", "1.2")}
    covered = dict.fromkeys(scores, 0)
    total = 0
    n_images = 0
    for image_id, path, label in reader.iter_labels():  # merged maps read back from labels.zarr
        gt = load_annotation(path)
        assert label.shape == gt.shape
        maps = {"merged": label}
        for stage in ("1.1", "1.2"):  # from the Parquet RLEs
            maps[stage] = stage_map(by_image.get(image_id, []), stage, gt.shape)
        for k, lab in maps.items():
            cov = lab != IGNORE_LABEL
            scores[k].update(np.where(cov, lab, 0), np.where(cov, gt, 255))  # scored on covered pixels only
            covered[k] += int(cov.sum())
        total += gt.size
        n_images += 1
    assert n_images == 8
    figures = {k: scores[k].compute()["mIoU"] for k in scores}
    for k in scores:
        print(f"oracle campaign, {k:>6} masks: mIoU {figures[k]:.2f}% on covered pixels, coverage {100 * covered[k] / total:.1f}%")
    assert figures["merged"] >= 93.0
    assert figures["1.2"] >= 90.0
    assert figures["1.1"] >= 95.0
    assert covered["merged"] / total > 0.8


def test_parquet_reads_back_with_pyarrow_and_pycocotools_alone(campaign):
    root = campaign / "camp"
    images = pq.read_table(root / "images").to_pylist()  # hive-partitioned directory, pyarrow only
    masks_table = pq.read_table(root / "masks")
    assert masks_table.schema.metadata[b"fmbseg_schema_version"] == b"1"
    masks = masks_table.to_pylist()
    assert len(images) == 8 and all(r["status"] == "ok" and r["error"] is None for r in images)
    n_by_image = {r["image_id"]: r["n_masks"] for r in images}
    assert sum(n_by_image.values()) == len(masks) > 0
    for r in images:
        rows = [m for m in masks if m["image_id"] == r["image_id"]]
        assert [m["mask_id"] for m in rows] == list(range(r["n_masks"]))
        stages = [m["stage"] for m in rows]
        assert stages == sorted(stages)  # all 1.1 masks first
    for m in masks:
        rle = {"size": [m["height"], m["width"]], "counts": m["rle"]}
        decoded = mask_utils.decode(rle)
        assert decoded.shape == (m["height"], m["width"])
        assert int(decoded.sum()) == m["area"] > 0
        np.testing.assert_allclose(mask_utils.toBbox(rle), m["bbox"])
        assert m["stage"] in ("1.1", "1.2") and m["class_name"] == CampaignReader(root).vocabulary[m["class_id"]]


def test_selected_follows_the_seeded_75_percent_rule(campaign):
    from fmbseg.stage1 import selection_rng

    masks = CampaignReader(campaign / "camp").masks().to_pylist()
    by_image = {}
    for m in masks:
        by_image.setdefault(m["image_id"], []).append(m)
    checked = 0
    for image_id, rows in by_image.items():
        s11 = [m["selected"] for m in rows if m["stage"] == "1.1"]
        idx12 = [i for i, m in enumerate(rows) if m["stage"] == "1.2"]
        assert all(s11)
        k = int(np.floor(0.75 * len(idx12) + 0.5))
        assert sum(rows[i]["selected"] for i in idx12) == k
        # the draw itself: k of the n12 masks without replacement, seeded by (campaign seed 0, image_id)
        expected = sorted(idx12[j] for j in selection_rng(0, image_id).choice(len(idx12), size=k, replace=False)) if k else []
        assert [i for i in idx12 if rows[i]["selected"]] == expected
        checked += len(idx12) > 1
    assert checked >= 4


def snapshot(root):
    """{relative path: (mtime_ns, bytes)} of every file of a campaign."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = (os.stat(p).st_mtime_ns, open(p, "rb").read())
    return out


def test_deleting_one_done_marker_recomputes_that_shard_only(campaign, tmp_path):
    camp = tmp_path / "camp"
    shutil.copytree(campaign / "camp", camp)
    before = snapshot(camp)
    rows_before = CampaignReader(camp).images().to_pylist(), CampaignReader(camp).masks().to_pylist()
    os.remove(camp / "done" / "000001.json")
    assert list(CampaignReader(camp).done()) == [0, 2]
    summary = run_label(config(campaign / "world", camp), progress=False)
    assert (summary["shards_labelled"], summary["shards_skipped"], summary["images"]) == (1, 2, 3)
    after = snapshot(camp)
    assert set(after) == set(before)
    rewritten = sorted(p for p in after if after[p][0] != before[p][0])
    assert rewritten and all("000001" in p for p in rewritten), rewritten
    assert "shards/000001.json" not in rewritten  # shard lists are immutable
    for p in after:
        if p.endswith(".parquet") or "labels.zarr" in p:
            assert after[p][1] == before[p][1], p  # identical outputs
    reader = CampaignReader(camp)
    assert (reader.images().to_pylist(), reader.masks().to_pylist()) == rows_before
    # a rerun with everything done touches nothing but campaign-level reads
    again = run_label(config(campaign / "world", camp), progress=False)
    assert again["shards_labelled"] == 0 and snapshot(camp) == after


def test_changed_stage1_config_is_refused_naming_fields(campaign, tmp_path):
    camp = tmp_path / "camp"
    shutil.copytree(campaign / "camp", camp)
    with pytest.raises(ValueError) as e:
        plan_campaign(config(campaign / "world", camp, stage1={"points_per_class": 3}, seed=4))
    msg = str(e.value)
    assert "stage1.points_per_class: 5 -> 3" in msg and "seed: 0 -> 4" in msg and "--overwrite" in msg
    with pytest.raises(ValueError, match="unknown Stage-1 config field"):
        plan_campaign(config(campaign / "world", camp, stage1={"points_per_clas": 3}))
    # --overwrite accepts the new config: every shard is stale and gets relabelled
    plan_campaign(config(campaign / "world", camp, seed=4, overwrite=True))
    assert CampaignReader(camp).done() == {}
    assert label_shard(str(camp), 2, device="cpu")["skipped"] is False
    assert list(CampaignReader(camp).done()) == [2]


def test_new_images_append_shards_and_retry_failed(tmp_path):
    world = tmp_path / "world"
    write_world(world, 3, seed=5, sizes=((96, 128),), formats=("png",))
    good = (world / "images" / "world_0001.png").read_bytes()
    (world / "images" / "world_0001.png").write_bytes(good[: len(good) // 3])  # truncated for now
    cfg = config(world, tmp_path / "camp", shard_size=2)
    s1 = run_label(cfg, progress=False)
    assert (s1["ok"], s1["failed"], s1["failure_reasons"]) == (2, 1, {"truncated": 1})
    status = campaign_status(str(tmp_path / "camp"))
    assert status["images_failed"] == 1 and status["failure_reasons"] == {"truncated": 1}
    print(format_status(status))
    # new images land in new shards; old shard lists are untouched
    write_world(world, 5, seed=5, sizes=((96, 128),), formats=("png",))
    (world / "images" / "world_0001.png").write_bytes(good)  # the file is repaired (write_world rewrote it too)
    s2 = run_label(cfg, progress=False)
    assert (s2["shards"], s2["shards_labelled"], s2["images"]) == (3, 1, 2)
    reader = CampaignReader(tmp_path / "camp")
    assert [e.image_id for e in reader.shard_images(1)] == ["world_0002.png"]
    assert [e.image_id for e in reader.shard_images(2)] == ["world_0003.png", "world_0004.png"]
    assert reader.images().column("status").to_pylist().count("failed") == 1  # not retried unless asked
    s3 = run_label(cfg, retry_failed=True, progress=False)
    assert (s3["shards_labelled"], s3["failed"]) == (1, 0)
    assert CampaignReader(tmp_path / "camp").images().column("status").to_pylist() == ["ok"] * 5


def test_campaign_on_an_object_store(tmp_path):
    """The same campaign through fsspec's in-memory filesystem (the object-store code path: single PUTs)."""
    import fsspec

    world = tmp_path / "world"
    write_world(world, 2, seed=9, sizes=((120, 150),), formats=("png", "jpg"))
    url = "memory://label-test/camp"
    s = run_label(config(world, url, shard_size=1), progress=False)
    assert (s["ok"], s["shards_labelled"]) == (2, 2) and s["masks"] > 0
    fs = fsspec.filesystem("memory")
    assert fs.exists("/label-test/camp/done/000001.json") and fs.exists("/label-test/camp/labels.zarr/000001/zarr.json")
    reader = CampaignReader(url)
    labels = {i: lab for i, _, lab in reader.iter_labels()}
    assert {i: lab.shape for i, lab in labels.items()} == {"world_0000.png": (120, 150), "world_0001.jpg": (120, 150)}
    assert reader.masks().num_rows == s["masks"]
    assert run_label(config(world, url, shard_size=1), progress=False)["shards_skipped"] == 2
    fs.rm("/label-test", recursive=True)


def test_models_and_text_embeddings_once_per_process(tmp_path, monkeypatch):
    import fmbseg.presets
    from stages import models_cache

    calls = {"clip": 0, "text": 0}
    real_make_clip = fmbseg.presets.make_clip

    def counting_make_clip(*a, **k):
        calls["clip"] += 1
        clip = real_make_clip(*a, **k)
        real_encode = clip.encode_text

        def encode_text(*a2, **k2):
            calls["text"] += 1
            return real_encode(*a2, **k2)

        clip.encode_text = encode_text
        return clip

    monkeypatch.setattr(fmbseg.presets, "make_clip", counting_make_clip)
    models_cache.clear()
    try:
        write_world(tmp_path / "w", 3, seed=4, sizes=((100, 140),), formats=("png",))
        s = run_label(config(tmp_path / "w", tmp_path / "c", shard_size=1), progress=False)
        assert s["shards_labelled"] == 3
        assert calls == {"clip": 1, "text": 1}
    finally:
        models_cache.clear()
