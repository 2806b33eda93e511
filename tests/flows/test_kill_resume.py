"""kill -9 of a worker (and every process it started) in the middle of a labeling campaign, then a rerun: the
campaign completes, its rows equal an uninterrupted run's, shards committed before the kill are not redone,
and no shard has two parts."""

from __future__ import annotations

import json
import os

import pytest

from flows.artifacts import artifact_key
from flows.server import client_settings, descendants, kill_tree

pytestmark = pytest.mark.slow


def test_kill_worker_mid_campaign_then_rerun(kit, prefect_server, start_worker, small_world, reference_campaign,
                                             tmp_path):
    campaign = tmp_path / "campaign"
    params = kit.label_params(small_world, campaign)  # 12 shards of one image
    worker = start_worker("doomed")
    run1 = kit.run_deployment(prefect_server, "label-campaign/default", params, watch=False)
    kit.wait_for(lambda: len(kit.done_markers(campaign)) >= 2, 120, "the first shards to be committed",
                 poll=0.02, logs=[tmp_path / "doomed.log"])
    tree = [worker.pid, *descendants(worker.pid)]
    assert len(tree) >= 2, "the flow run should be a process of its own under the worker"
    kill_tree(worker.pid)
    worker.wait(timeout=10)
    kit.wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and _state(p) != "Z" for p in tree), 10,
                 "the killed processes to disappear")

    at_kill = kit.done_markers(campaign)
    print(f"\nkilled the worker tree ({len(tree)} processes) with {len(at_kill)}/12 shards committed")
    assert 2 <= len(at_kill) < 12, "the kill must land in the middle of the campaign"
    assert kit.flow_run_state(prefect_server, run1) == "RUNNING"  # nobody told the server: a hard crash

    start_worker("rescuer")
    run2 = kit.run_deployment(prefect_server, "label-campaign/default", params)
    assert kit.flow_run_state(prefect_server, run2) == "COMPLETED"

    after = kit.done_markers(campaign)
    assert len(after) == 12
    assert {k: after[k] for k in at_kill} == at_kill, "shards committed before the kill were redone"
    files = kit.shard_files(campaign)
    assert all(names == ["part-0.parquet"] for t in files.values() for names in t.values()), files
    assert sorted(p.name for p in (campaign / "labels.zarr").iterdir() if p.is_dir()) == \
        [f"{i:06d}" for i in range(12)]
    assert kit.sorted_masks(campaign).equals(kit.sorted_masks(reference_campaign))

    with client_settings(prefect_server.api_url, prefect_server.home):
        from prefect.artifacts import Artifact

        summary = json.loads(Artifact.get(artifact_key("label-summary", str(campaign), 0)).data)[0]
    assert (summary["shards_skipped"], summary["shards_labeled"]) == (len(at_kill), 12 - len(at_kill))


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
