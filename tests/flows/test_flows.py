"""The flows run in this process against the session's Prefect server: wiring, retries, artifacts, resumable
reruns, and that changing only a training setting never recomputes Stage 1."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import fmbseg.stage1
import flows.label_flow as label_flow_module
from flows.artifacts import artifact_key, markdown_table, summarize_label_results
from flows.label_flow import label_campaign
from flows.pipeline import fmbseg_pipeline


def test_artifact_keys_are_valid_and_distinct():
    key = artifact_key("label-progress", "/data/My Campaign_01", rank=1)
    assert re.fullmatch(r"[a-z0-9-]+", key), key
    assert key.startswith("label-progress-my-campaign-01-") and key.endswith("-rank1")
    assert artifact_key("label-progress", "/other/My Campaign_01", rank=1) != key  # same name, other place
    assert re.fullmatch(r"[a-z0-9-]+", artifact_key("evaluation", "s3://bucket/c1/"))
    assert artifact_key("evaluation", "c1") == artifact_key("evaluation", os.path.abspath("c1"))


def test_label_summary_counts_only_work_done_this_run():
    results = [
        {"shard_id": 0, "images": 4, "ok": 3, "failed": 1, "masks": 10, "skipped": False},
        {"shard_id": 1, "images": 4, "ok": 4, "failed": 0, "masks": 7, "skipped": True},
    ]
    s = summarize_label_results(results, failed_shards=[2], seconds=2.0)
    assert s == {"shards": 3, "shards_labeled": 1, "shards_skipped": 1, "shards_failed": 1, "images": 4,
                 "images_ok": 3, "images_failed": 1, "masks": 10, "seconds": 2.0, "images_per_s": 2.0}
    assert markdown_table([{"a": 1, "b": 0.123456}, {"a": 2, "c": "x|y"}]).splitlines() == [
        "| a | b | c |", "|---|---|---|", "| 1 | 0.1235 |  |", "| 2 |  | x\\|y |"]


@pytest.fixture
def count_stage1(monkeypatch):
    """Counts images entering the per-image Stage-1 algorithm: its input check, which both the serial loop
    (run_stage1) and the pipelined one (stages/label_pipeline.py) call once per image, by module attribute."""
    calls = []
    real = fmbseg.stage1.check_stage1_inputs

    def counting(*args, **kwargs):
        calls.append(kwargs.get("image_id", args[-1] if args else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(fmbseg.stage1, "check_stage1_inputs", counting)
    return calls


def _artifact(key: str):
    from prefect.artifacts import Artifact

    art = Artifact.get(key)
    assert art is not None, f"no artifact with key {key}"
    return art


def test_label_flow_labels_then_rerun_is_a_no_op(kit, prefect_api, small_world, reference_campaign, tmp_path,
                                                count_stage1):
    campaign = tmp_path / "campaign"
    s = label_campaign(**kit.label_params(small_world, campaign))
    print(f"\nlabel-campaign: {s['images']} images, {s['masks']} masks, {s['images_failed']} failed, "
          f"{s['images_per_s']:.2f} images/s over {s['shards_labeled']} shards")
    assert (s["shards"], s["shards_labeled"], s["shards_skipped"], s["images"]) == (12, 12, 0, 12)
    assert len(count_stage1) == 12
    assert kit.sorted_masks(campaign).equals(kit.sorted_masks(reference_campaign))
    assert s["masks"] == kit.sorted_masks(reference_campaign).num_rows

    progress = _artifact(artifact_key("label-progress", str(campaign), 0))
    assert float(progress.data) == pytest.approx(100.0)
    table = _artifact(artifact_key("label-summary", str(campaign), 0))
    row = json.loads(table.data)[0]
    assert (row["images"], row["masks"], row["images_failed"]) == (12, s["masks"], 0)
    assert row["images_per_s"] > 0

    before = kit.done_markers(campaign)
    again = label_campaign(**kit.label_params(small_world, campaign))
    assert again["labeled"] == [] and sorted(again["skipped"]) == list(range(12))
    assert (again["images"], again["images_per_s"]) == (0, 0.0)
    assert len(count_stage1) == 12, "a rerun must not run Stage 1 again"
    assert kit.done_markers(campaign) == before


def test_failing_shard_is_retried_and_does_not_stop_the_others(kit, prefect_api, tmp_path, monkeypatch):
    world = kit.write_small_world(tmp_path / "world", 4, seed=5)
    campaign = tmp_path / "campaign"
    real = label_flow_module.label_shard
    attempts: dict[int, int] = {}

    def flaky(campaign, shard_id, device="auto", retry_failed=False):
        attempts[shard_id] = attempts.get(shard_id, 0) + 1
        if shard_id == 1 or (shard_id == 2 and attempts[shard_id] == 1):
            raise OSError(f"disk went away while labeling shard {shard_id}")
        return real(campaign, shard_id, device=device, retry_failed=retry_failed)

    monkeypatch.setattr(label_flow_module, "label_shard", flaky)
    with pytest.raises(RuntimeError, match=r"1 of 4 shards failed after retries: \[1\]"):
        label_campaign(**kit.label_params(world, campaign), shard_retries=2, retry_delay_seconds=0)
    assert attempts == {0: 1, 1: 3, 2: 2, 3: 1}  # shard 1: first try + 2 retries; shard 2 recovered on retry
    assert sorted(kit.done_markers(campaign)) == ["000000.json", "000002.json", "000003.json"]

    monkeypatch.setattr(label_flow_module, "label_shard", real)
    s = label_campaign(**kit.label_params(world, campaign))
    assert s["labeled"] == [1] and s["skipped"] == [0, 2, 3]


def test_bad_input_is_not_retried(kit, prefect_api, small_world, reference_campaign, monkeypatch):
    real = label_flow_module.plan_campaign
    calls = []

    def counting(cfg):
        calls.append(cfg)
        return real(cfg)

    monkeypatch.setattr(label_flow_module, "plan_campaign", counting)
    # The reference campaign was labeled with seed 0: another seed is another Stage-1 config.
    with pytest.raises(ValueError, match="seed"):
        label_campaign(**kit.label_params(small_world, reference_campaign, seed=7))
    assert len(calls) == 1
    with pytest.raises(ValueError, match="rank"):
        label_campaign(**kit.label_params(small_world, reference_campaign), rank=2, world_size=2)
    with pytest.raises(ValueError, match="images, vocab, campaign"):
        fmbseg_pipeline()


def _stage1_files(campaign: Path) -> dict[str, float]:
    """mtime of every Stage-1 output file (done markers, shard lists, Parquet, Zarr)."""
    out = {}
    for sub in ("done", "shards", "images", "masks", "labels.zarr"):
        for p in (campaign / sub).rglob("*"):
            if p.is_file():
                out[str(p.relative_to(campaign))] = p.stat().st_mtime_ns
    out["campaign.json"] = (campaign / "campaign.json").stat().st_mtime_ns
    return out


def test_changing_a_training_setting_reruns_training_and_evaluation_only(kit, prefect_api, small_world, eval_world,
                                                                        tmp_path, count_stage1):
    campaign = tmp_path / "campaign"
    params = dict(kit.label_params(small_world, campaign, shard_size=4), train=kit.FAST_TRAIN, eval_dataset="custom",
                  eval_data_root=str(eval_world), eval_models="maskclip,fmbseg")
    first = fmbseg_pipeline(**params)
    ckpt1 = Path(first["checkpoint"])
    assert ckpt1.is_file() and ckpt1.parent.parent == campaign / "train"
    assert (Path(first["eval_out"]) / "results.md").is_file()
    assert set(first["evaluation"]) == {"maskclip", "fmbseg"}
    print(f"\npipeline 1: label {first['label']['images']} images, mIoU "
          + ", ".join(f"{m} {r['mIoU']:.3f}" for m, r in first["evaluation"].items()))
    assert len(count_stage1) == 12
    stage1_before = _stage1_files(campaign)
    ckpt1_mtime = ckpt1.stat().st_mtime_ns

    second = fmbseg_pipeline(**{**params, "train": {**kit.FAST_TRAIN, "epochs": 2}})
    assert len(count_stage1) == 12, "Stage 1 ran again after only a training setting changed"
    assert second["label"]["labeled"] == [] and second["label"]["shards_skipped"] == 3
    assert _stage1_files(campaign) == stage1_before
    ckpt2 = Path(second["checkpoint"])
    assert ckpt2 != ckpt1 and ckpt2.is_file() and ckpt1.stat().st_mtime_ns == ckpt1_mtime
    assert second["eval_out"] != first["eval_out"] and (Path(second["eval_out"]) / "results.md").is_file()
    evaluation = _artifact(artifact_key("evaluation", second["eval_out"]))
    assert "fmbseg" in evaluation.data and "maskclip" in evaluation.data


def test_pipeline_ranks_split_labeling_and_rank0_trains(kit, prefect_api, small_world, reference_campaign, tmp_path,
                                                        count_stage1):
    campaign = tmp_path / "campaign"
    params = dict(kit.label_params(small_world, campaign, shard_size=3), train=kit.FAST_TRAIN, world_size=2)
    with pytest.raises(RuntimeError, match=r"2/4 shards done .* are all ranks running"):
        fmbseg_pipeline(**params, rank=0, wait_timeout_s=0)
    r1 = fmbseg_pipeline(**params, rank=1)
    assert "checkpoint" not in r1 and r1["label"]["labeled"] == [1, 3]
    r0 = fmbseg_pipeline(**params, rank=0, wait_timeout_s=60)
    assert r0["label"]["skipped"] == [0, 2] and r0["campaign_status"]["shards_done"] == 4
    assert Path(r0["checkpoint"]).is_file()
    assert len(count_stage1) == 12  # every image labeled exactly once across the ranks
    assert kit.sorted_masks(campaign).equals(kit.sorted_masks(reference_campaign))


def test_shard_log_line_names_images_failures_masks_and_time():
    """Per-shard task logs say what the shard did, not only "Finished in state Completed()"."""
    from flows.label_flow import log_shard_result

    lines = []

    class Logger:
        def info(self, fmt, *args):
            lines.append(fmt % args)

    log_shard_result(Logger(), {"shard_id": 7, "images": 10, "ok": 8, "failed": 2, "masks": 31, "seconds": 4.0,
                                "skipped": False, "failure_reasons": {"not an image": 1, "truncated": 1}})
    log_shard_result(Logger(), {"shard_id": 8, "images": 5, "ok": 5, "failed": 0, "masks": 9, "seconds": 0.0,
                                "skipped": True})
    assert lines == ["shard 000007 labelled: 10 images (8 ok, 2 failed: not an image x1, truncated x1), 31 masks, "
                     "4.0 s (2.50 images/s)",
                     "shard 000008 already done: 5 images (5 ok, 0 failed), 9 masks; skipped"]
