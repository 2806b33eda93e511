"""The pipelined labeling loop (stages/label_pipeline.py) against the serial one (`run_stage1` per image): the same
bytes in the same order, failures in place, and no exception of the background lanes lost."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fmbseg.testing.world import write_world
from stages import models_cache
from stages.label import LabelConfig, run_label
from stages.label_pipeline import ExecutionConfig
from storage.layout import images_path, masks_path
from storage.reader import CampaignReader

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SERIAL = ExecutionConfig(pipeline=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """6 images of mixed sizes and formats with an undecodable file and an empty file in the middle."""
    base = tmp_path_factory.mktemp("pipeline")
    write_world(base / "w", 6, seed=3, sizes=((96, 128), (120, 80), (64, 64)), formats=("png", "jpg"))
    (base / "w" / "images" / "world_0002b.png").write_bytes(b"this is not a PNG")
    (base / "w" / "images" / "world_0004b.jpg").write_bytes(b"")
    return base / "w"


def _label(world: Path, campaign: Path, execution: ExecutionConfig, preset: str = "oracle", **kw) -> dict:
    return run_label(LabelConfig(images=str(world / "images"), vocab=str(world / "classes.txt"),
                                 campaign=str(campaign), preset=preset, device="cpu", execution=execution, **kw),
                     progress=False)


def _assert_same_campaign(a: Path, b: Path) -> None:
    ra, rb = CampaignReader(a), CampaignReader(b)
    assert ra.shards() == rb.shards()
    for sid in ra.shards():
        for rel in (images_path(sid), masks_path(sid)):
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs"
    la, lb = list(ra.iter_labels()), list(rb.iter_labels())
    assert [(i, p) for i, p, _ in la] == [(i, p) for i, p, _ in lb]
    for (_, _, x), (_, _, y) in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.mark.parametrize("execution", [ExecutionConfig(), ExecutionConfig(prefetch=1, host_workers=1),
                                       ExecutionConfig(prefetch=5, host_workers=2, sam_batch=3)],
                         ids=["default", "no-lookahead", "sam_batch3"])
def test_pipelined_oracle_campaign_is_byte_equal_to_the_serial_loop(world, tmp_path, execution):
    s = _label(world, tmp_path / "serial", SERIAL, shard_size=5)
    p = _label(world, tmp_path / "pipe", execution, shard_size=5)
    assert (s["images"], s["ok"], s["failed"], s["masks"]) == (p["images"], p["ok"], p["failed"], p["masks"])
    assert (s["images"], s["failed"]) == (8, 2) and s["masks"] > 0
    assert s["failure_reasons"] == p["failure_reasons"]
    _assert_same_campaign(tmp_path / "serial", tmp_path / "pipe")
    rows = CampaignReader(tmp_path / "pipe").images().to_pylist()
    assert [r["image_id"] for r in rows] == sorted(r["image_id"] for r in rows)  # shard order kept
    assert [r["status"] for r in rows if r["image_id"].endswith("b.png") or r["image_id"].endswith("b.jpg")] == \
        ["failed", "failed"]
    assert p["pipeline"]["wall"] > 0 and s["pipeline"] is None


def test_pipelined_tiny_campaign_is_byte_equal_to_the_serial_loop(tmp_path, one_torch_thread):
    write_world(tmp_path / "w", 2, seed=4, sizes=((64, 80), (72, 56)), formats=("png", "jpg"))
    s = _label(tmp_path / "w", tmp_path / "serial", SERIAL, preset="tiny", stage1={"points_per_side": 4})
    p = _label(tmp_path / "w", tmp_path / "pipe", ExecutionConfig(), preset="tiny", stage1={"points_per_side": 4})
    assert (s["ok"], s["masks"]) == (p["ok"], p["masks"]) and s["masks"] > 0
    _assert_same_campaign(tmp_path / "serial", tmp_path / "pipe")


def test_a_failing_batched_call_is_retried_image_by_image(world, tmp_path, monkeypatch):
    """A SAM batch that raises because of one image: the others are relabelled alone, that one gets its row."""
    import fmbseg.models.sliding as sliding

    _, sam = models_cache.get_models("oracle", "cpu")
    real_many, real_sliding = sam.embed_many, sliding.sliding_features_many
    batches = []

    def slow_first(*args, **kwargs):  # lets the look-ahead fill, so the next groups hold several images
        if not batches:
            time.sleep(0.3)
        return real_sliding(*args, **kwargs)

    def embed_many(images, prepared=None):
        batches.append(len(images))
        if any(im.shape[:2] == (120, 80) for im in images):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_many(images, prepared)

    monkeypatch.setattr(sliding, "sliding_features_many", slow_first)
    monkeypatch.setattr(sam, "embed_many", embed_many)
    s = _label(world, tmp_path / "c", ExecutionConfig(prefetch=6, host_workers=2, sam_batch=4), shard_size=8)
    assert max(batches) > 1, f"no batch of several images formed: {batches}"
    rows = CampaignReader(tmp_path / "c").images().to_pylist()
    by_id = {r["image_id"]: r for r in rows}
    oom = [r["image_id"] for r in rows if r["error"] == "RuntimeError: CUDA out of memory (simulated)"]
    assert oom and all((by_id[i]["height"], by_id[i]["width"]) == (120, 80) for i in oom)
    assert all(r["status"] == "ok" for r in rows if r["height"] not in (120, None))
    monkeypatch.undo()
    ref = _label(world, tmp_path / "ref", SERIAL, shard_size=8)
    ok = CampaignReader(tmp_path / "c").masks().to_pylist()
    expect = [m for m in CampaignReader(tmp_path / "ref").masks().to_pylist() if m["image_id"] not in oom]
    assert ok == expect and s["failed"] == ref["failed"] + len(oom)


def test_an_exception_in_the_writer_lane_reaches_the_caller(world, tmp_path):
    from stages.label import label_shard, plan_campaign

    cfg = LabelConfig(images=str(world / "images"), vocab=str(world / "classes.txt"), campaign=str(tmp_path / "c"),
                      preset="oracle", device="cpu", shard_size=8)
    (sid,) = plan_campaign(cfg)
    seen = []

    def progress(masks, failed):
        seen.append(masks)
        if len(seen) == 3:
            raise KeyError("progress bar broke")

    t0 = time.perf_counter()
    with pytest.raises(KeyError, match="progress bar broke"):
        label_shard(cfg.campaign, sid, "cpu", on_image=progress, execution=ExecutionConfig(prefetch=2))
    assert time.perf_counter() - t0 < 30 and len(seen) == 3
    assert CampaignReader(tmp_path / "c").done() == {}  # nothing committed


def test_sliding_crops_batched_across_images_match_each_image_alone():
    """Crops of several images share CLIP batches (the CUDA path): same layout, features equal up to the GEMM's
    batch-size dependence (which is why CPU runs keep per-image batches)."""
    from fmbseg.models.sliding import prepare_sliding, sliding_features_many, sliding_window_features

    clip, _ = models_cache.get_models("oracle", "cpu")
    rng = np.random.default_rng(0)
    from fmbseg.testing.palette import PALETTE_RGB as pal

    images = [pal[rng.integers(0, len(pal), (h // 8, w // 8))].repeat(8, 0).repeat(8, 1)
              for h, w in ((96, 128), (120, 80), (64, 200))]
    inputs = [prepare_sliding(im, clip.input_size, clip.patch_size, 2.0, 2048) for im in images]
    for bs in (3, 7, 32):
        many = sliding_features_many(clip, inputs, bs, across_images=True)
        for im, got in zip(images, many):
            ref = sliding_window_features(clip, im, 2.0, 2048, bs)
            torch.testing.assert_close(got.crop_cls, ref.crop_cls, atol=1e-6, rtol=0)
            torch.testing.assert_close(got.dense, ref.dense, atol=1e-6, rtol=0)
            assert np.array_equal(ref.crop_boxes, got.crop_boxes) and ref.scale_xy == got.scale_xy


def test_sam_embed_many_equals_embed(one_torch_thread):
    from fmbseg.presets import make_sam

    sam = make_sam("tiny", "cpu")
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((96, 128), (120, 80), (50, 70))]
    one = [sam.embed(im) for im in images]
    alone = sam.embed_many(images[:1])[0]
    assert torch.equal(alone.features, one[0].features)  # a batch of one is the same computation
    for ref, got in zip(one, sam.embed_many(images, [sam.prepare(im) for im in images])):
        assert (got.original_hw, got.input_hw) == (ref.original_hw, ref.input_hw)
        # CPU GEMMs change with the batch's row count: ~2e-6 here, which is why sam_batch is 1 on CPU.
        torch.testing.assert_close(got.features, ref.features, atol=1e-5, rtol=0)


def test_cli_label_profile_prints_the_time_split_and_idle_fractions(world, tmp_path, capsys):
    import re

    from flows.cli import main

    args = ["label", "--images", str(world / "images"), "--vocab", str(world / "classes.txt"), "--preset", "oracle",
            "--device", "cpu", "--no-progress", "--profile"]
    assert main([*args, "--campaign", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    print(out)
    for part in ("decode + EXIF", "CLIP upscale + SAM resize", "SAM encoder", "RLE, rows, commit"):
        assert re.search(rf"{re.escape(part)} +\d+\.\d ms/image", out), part
    m = re.search(r"GPU waiting for host (\d+)%, host waiting for GPU (\d+)%", out)
    assert m and all(0 <= int(g) <= 100 for g in m.groups())
    assert main([*args, "--serial", "--campaign", str(tmp_path / "s")]) == 0
    assert "pipeline   off (serial loop)" in capsys.readouterr().out
    _assert_same_campaign(tmp_path / "s", tmp_path / "p")


@pytest.mark.parametrize("n", [0, 1, 4, 9])
def test_image_masks_encode_as_their_stack(n):
    from types import SimpleNamespace

    from stages.label_pipeline import _encode_image_masks
    from storage.tables import decode_rle, encode_masks

    rng = np.random.default_rng(n)
    stack = rng.random((n, 37, 53)) < rng.random((n, 1, 1))
    got = _encode_image_masks([SimpleNamespace(mask=m) for m in stack], (37, 53))
    ref = encode_masks(stack)
    assert got.counts == ref.counts
    assert np.array_equal(got.area, ref.area) and got.area.dtype == ref.area.dtype
    assert np.array_equal(got.bbox, ref.bbox) and got.bbox.dtype == ref.bbox.dtype
    for c, m in zip(got.counts, stack):
        assert np.array_equal(decode_rle(c, 37, 53), m)
    with pytest.raises(RuntimeError, match="mask for a"):
        _encode_image_masks([SimpleNamespace(mask=np.zeros((37, 52), bool))], (37, 53))


@pytest.mark.parametrize("preset", ["oracle", "tiny"])
def test_device_resize_campaign_is_byte_equal_to_the_serial_loop(world, tmp_path, one_torch_thread, preset):
    """The CLIP upscale and SAM resize on the model's device (`ExecutionConfig.device_resize`, on by default on
    CUDA; here the CPU torch version) write the bytes of the serial loop's PIL resizes."""
    kw = {"stage1": {"points_per_side": 4}} if preset == "tiny" else {}
    s = _label(world, tmp_path / "serial", SERIAL, preset=preset, shard_size=5, **kw)
    p = _label(world, tmp_path / "dev", ExecutionConfig(device_resize=True), preset=preset, shard_size=5, **kw)
    assert (s["ok"], s["masks"]) == (p["ok"], p["masks"]) and s["masks"] > 0
    _assert_same_campaign(tmp_path / "serial", tmp_path / "dev")


def test_device_resize_defaults_to_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not ExecutionConfig().resolved_device_resize(cpu) and ExecutionConfig().resolved_device_resize(cuda)
    assert ExecutionConfig(device_resize=True).resolved_device_resize(cpu)
    assert not ExecutionConfig(device_resize=False).resolved_device_resize(cuda)
    with pytest.raises(ValueError, match="device_resize"):
        ExecutionConfig(device_resize="yes")
