"""End to end through Prefect as a user runs it: a real server on 127.0.0.1, a `process` work pool,
`prefect deploy --all` from prefect.yaml, workers, `prefect deployment run ...`."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import pytest

from flows.artifacts import artifact_key
from flows.server import client_settings

pytestmark = pytest.mark.slow

EXPECTED = {"label-campaign/default", "train-alignment/default", "evaluate/default", "fmbseg-pipeline/default",
            "fmbseg-pipeline/demo", "relabel-campaign/default"}


def _client(server):
    from prefect import get_client

    return get_client(sync_client=True)


def test_deploy_all_registers_every_flow_on_the_pool(prefect_server, deployed):
    with client_settings(prefect_server.api_url, prefect_server.home), _client(prefect_server) as client:
        deployments = client.read_deployments()
        names = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in deployments}
    assert EXPECTED <= set(names)
    assert {names[n].work_pool_name for n in EXPECTED} == {deployed}
    demo = names["fmbseg-pipeline/demo"]
    assert demo.parameters["preset"] == "oracle" and demo.parameters["demo_root"] == "~/fmbseg-demo"
    # The deployment and `fmbseg demo` train the same way.
    from flows.demo import DEMO_TRAIN

    assert demo.parameters["train"] == DEMO_TRAIN
    assert demo.entrypoint == "flows/pipeline.py:fmbseg_pipeline"


def test_demo_deployment_end_to_end(kit, prefect_server, start_worker, tmp_path):
    start_worker("demo-worker")
    root = tmp_path / "demo"
    t0 = time.perf_counter()
    run_id = kit.run_deployment(prefect_server, "fmbseg-pipeline/demo", {
        "demo_root": str(root), "demo_train_images": 6, "demo_eval_images": 2, "train": kit.FAST_TRAIN,
    })
    print(f"\n'fmbseg-pipeline/demo' through a worker: {time.perf_counter() - t0:.1f} s")
    assert kit.flow_run_state(prefect_server, run_id) == "COMPLETED"

    assert len(list((root / "world/train/images").iterdir())) == 6
    assert len(list((root / "world/eval/images").iterdir())) == 2
    campaign = root / "campaign"
    assert sorted(kit.done_markers(campaign)) == ["000000.json"]  # 6 images, shard size 8
    assert kit.sorted_masks(campaign).num_rows > 0
    checkpoints = list((campaign / "train").glob("*/model.pt"))
    assert len(checkpoints) == 1
    report = (root / "report" / "results.md").read_text()
    for model in ("maskclip", "fmbseg", "stage1"):
        assert model in report
    assert len(list((root / "overlays").glob("*_overlay.jpg"))) == 2

    with client_settings(prefect_server.api_url, prefect_server.home):
        from prefect.artifacts import Artifact

        evaluation = Artifact.get(artifact_key("evaluation", str(root / "report")))
        progress = Artifact.get(artifact_key("label-progress", str(campaign), 0))
    assert evaluation is not None and "fmbseg" in evaluation.data
    assert progress is not None and float(progress.data) == pytest.approx(100.0)


def test_two_workers_split_one_campaign(kit, prefect_server, start_worker, small_world, reference_campaign,
                                        tmp_path):
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    for i in range(2):
        start_worker(f"w{i}", limit=1)
    kit.wait_for(lambda: all("started" in (p.read_text() if p.exists() else "") for p in logs), 60,
                 "both workers to start", logs=logs)
    campaign = tmp_path / "campaign"
    params = kit.label_params(small_world, campaign, world_size=2)
    runs = [kit.run_deployment(prefect_server, "label-campaign/default", {**params, "rank": r}, watch=False)
            for r in range(2)]
    kit.wait_for(lambda: all(kit.flow_run_state(prefect_server, r) in ("COMPLETED", "FAILED", "CRASHED")
                             for r in runs), 240, "both ranks to finish", poll=0.5, logs=logs)
    assert [kit.flow_run_state(prefect_server, r) for r in runs] == ["COMPLETED", "COMPLETED"]

    # Each worker ran one of the two flow runs (a worker takes one run at a time: --limit 1; both may try to
    # submit the same run, the server lets one of them have it).
    with client_settings(prefect_server.api_url, prefect_server.home), _client(prefect_server) as client:
        run_names = {client.read_flow_run(r).name for r in runs}
    ran = [set(re.findall(r"Flow run '([\w-]+)' submitted to infrastructure", p.read_text())) for p in logs]
    assert sorted(map(len, ran)) == [1, 1] and ran[0] | ran[1] == run_names, ran

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with client_settings(prefect_server.api_url, prefect_server.home), _client(prefect_server) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=runs)), limit=200)
        by_run = {str(r): [t for t in task_runs if str(t.flow_run_id) == str(r)] for r in runs}
    shards = Counter()
    for rank, run in enumerate(runs):
        mine = [int(t.name.rsplit("-", 1)[1]) for t in by_run[run] if t.name.startswith("label-shard-")]
        assert all(s % 2 == rank for s in mine), (rank, mine)
        assert all(t.state.is_completed() for t in by_run[run])
        shards.update(mine)
    print(f"\nshards per rank: {[sum(1 for s in shards if s % 2 == r) for r in range(2)]}")
    assert shards == Counter({s: 1 for s in range(12)}), "every shard must be labeled exactly once"
    assert len(kit.done_markers(campaign)) == 12
    files = kit.shard_files(campaign)
    assert all(names == ["part-0.parquet"] for t in files.values() for names in t.values())
    assert kit.sorted_masks(campaign).equals(kit.sorted_masks(reference_campaign))


def test_fmbseg_deploy_onto_another_pool_with_a_gpu_limit_then_back(prefect_server, deployed):
    """`fmbseg deploy --pool P --create-pool --gpu-limit N` creates the pool and the tag concurrency limit and moves
    every deployment onto P; `fmbseg deploy` with no pool deploys onto prefect.yaml's `fmbseg` again (restoring
    the session's deployments for the other tests)."""
    import subprocess
    import sys

    from flows.gpu import GPU_TAG

    env = prefect_server.env()
    env.pop("FMBSEG_WORK_POOL", None)

    def deploy(*args):
        res = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", *args], env=env, capture_output=True,
                             text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res.stdout

    def pools():
        with client_settings(prefect_server.api_url, prefect_server.home), _client(prefect_server) as client:
            return {f"{client.read_flow(d.flow_id).name}/{d.name}": d.work_pool_name
                    for d in client.read_deployments()}

    try:
        out = deploy("--pool", "gpu-box", "--create-pool", "--gpu-limit", "2")
        assert "created work pool gpu-box" in out
        assert {pools()[n] for n in EXPECTED} == {"gpu-box"}
        with client_settings(prefect_server.api_url, prefect_server.home), _client(prefect_server) as client:
            assert client.read_concurrency_limit_by_tag(GPU_TAG).concurrency_limit == 2
            assert client.read_work_pool("gpu-box").type == "process"
    finally:
        deploy()
        # The limit must not outlive this test: a slot held by a task another test kills would stall later ones.
        prefect_server.cli("concurrency-limit", "delete", GPU_TAG, check=False)
    assert {pools()[n] for n in EXPECTED} == {deployed}
