"""Labeling and evaluation on Ray through prefect-ray's RayTaskRunner, against ONE local Ray cluster per test
session (`ray start --head` on 127.0.0.1 with 2 CPUs and 2 logical GPUs, free ports, killed with its whole
process tree at the end) and the session's Prefect server.

Every flow run connects to the cluster by address (as a multi-node deployment does), as its own Ray job; a job's
`runtime_env` installs tests/flows/ray_hooks.py in that job's worker processes (commit log, fault injection).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from flows.server import free_port, kill_tree

pytestmark = pytest.mark.slow
HOST = "127.0.0.1"


def _ray_exe() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ray")


def _gcs_up(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


@pytest.fixture(scope="session")
def ray_cluster():
    """`ray start --head --block` on 127.0.0.1 (2 CPUs, 2 logical GPUs): -> its address `127.0.0.1:PORT`."""
    # A short temp dir: Ray's unix sockets live under it and socket paths are limited to ~107 characters.
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    port = free_port()
    cmd = [_ray_exe(), "start", "--head", "--block", "--node-ip-address", HOST, "--port", str(port),
           "--num-cpus", "2", "--num-gpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
           "--temp-dir", tmp]
    for flag in ("--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port", "--object-manager-port"):
        cmd += [flag, str(free_port())]
    log_path = Path(tmp) / "head.log"
    # No token authentication on this loopback-only cluster, whatever ~/.ray holds (Ray 2.60 turns it on when a
    # token file exists): the head and this process (the driver of every flow run) agree on "disabled".
    saved_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONPATH": _pythonpath()})
    try:
        deadline = time.monotonic() + 120
        while not _gcs_up(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head failed:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield f"{HOST}:{port}"
    finally:
        kill_tree(proc.pid, signal.SIGKILL)
        if saved_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved_mode


def _pythonpath() -> str:
    """The repository root first on the workers' path: they import `tests.flows.ray_hooks` (the package code is
    installed, the tests are not)."""
    repo = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join([repo, *filter(None, [os.environ.get("PYTHONPATH")])])


def hooks(hook_dir: Path, mode: str = "log") -> dict:
    """`ray_init_kwargs` that install tests/flows/ray_hooks.py in every worker of the flow run's Ray job."""
    return {
        "_node_ip_address": HOST,
        "runtime_env": {
            "worker_process_setup_hook": "tests.flows.ray_hooks.install",
            "env_vars": {"FMBSEG_RAY_HOOK_DIR": str(hook_dir), "FMBSEG_RAY_HOOK_MODE": mode},
        },
    }


def commits(hook_dir: Path) -> Counter:
    """How often each shard was committed (done marker written), from the hook's commit log."""
    path = hook_dir / "commits"
    lines = path.read_text().split() if path.exists() else []
    return Counter(int(sid) for sid in lines[0::2])


def sorted_images(campaign: Path):
    from storage.reader import CampaignReader

    return CampaignReader(str(campaign)).images().sort_by("image_id")


def assert_equals_reference(kit, campaign: Path, reference: Path) -> None:
    assert kit.sorted_masks(campaign).equals(kit.sorted_masks(reference))
    assert sorted_images(campaign).equals(sorted_images(reference))


def test_ray_runner_settings():
    """How `ray_address` maps onto RayTaskRunner / ray.init, and the Ray options of a shard task."""
    from flows.ray_runner import check_runner, default_gpus_per_shard, ray_task_runner, shard_remote_options

    local = ray_task_runner(None, {"num_cpus": 2})
    assert (local.address, local.init_kwargs["address"], local.init_kwargs["num_cpus"]) == (None, "local", 2)
    auto = ray_task_runner("auto")
    assert (auto.address, auto.init_kwargs["address"]) == (None, "auto")  # join or fail, never start one
    remote = ray_task_runner("10.0.0.1:6379")
    assert remote.address == "10.0.0.1:6379" and "address" not in remote.init_kwargs
    opts = shard_remote_options(1.0, 4.0, 3)
    assert opts == {"num_gpus": 1, "num_cpus": 4, "max_retries": 3, "max_calls": 0, "retry_exceptions": False}
    assert shard_remote_options(0.5, 1, 0)["num_gpus"] == 0.5
    assert default_gpus_per_shard(2) == 2.0
    for bad in (lambda: check_runner("dask"), lambda: default_gpus_per_shard(-1),
                lambda: shard_remote_options(1, -1, 3)):
        with pytest.raises(ValueError):
            bad()


def test_pending_shards_are_those_without_a_matching_marker(reference_campaign, tmp_path):
    """What a Ray run submits: shards without a done marker, with another Stage-1 hash, or (retry_failed) with
    failed images -- read from one listing of done/ and one batch of marker reads."""
    import json
    import shutil

    from flows.label_flow import pending_shards

    campaign = tmp_path / "c"
    shutil.copytree(reference_campaign, campaign)
    assert pending_shards(str(campaign), list(range(12))) == []
    (campaign / "done" / "000003.json").unlink()
    stale = json.loads((campaign / "done" / "000005.json").read_text())
    (campaign / "done" / "000005.json").write_text(json.dumps({**stale, "stage1_hash": "0" * 64}))
    failed = json.loads((campaign / "done" / "000007.json").read_text())
    (campaign / "done" / "000007.json").write_text(json.dumps({**failed, "failed": 1}))
    assert pending_shards(str(campaign), list(range(12))) == [3, 5]
    assert pending_shards(str(campaign), list(range(12)), retry_failed=True) == [3, 5, 7]
    assert pending_shards(str(campaign), [7, 3, 11]) == [3]


def test_ray_labels_like_the_local_runner_over_two_workers_despite_a_killed_worker(
        kit, prefect_api, ray_cluster, small_world, reference_campaign, tmp_path):
    """One run proves both: the campaign labelled on Ray equals the local runner's row for row, shards spread
    over >= 2 worker processes, and a worker killed with SIGKILL mid-shard costs nothing but a re-run of that
    shard elsewhere (Ray's max_retries) -- committed once. (One run, not two: each Ray job starts fresh
    worker processes, the dearest part of these tests.)"""
    from flows.label_flow import label_campaign

    campaign, hook_dir = tmp_path / "campaign", tmp_path / "hooks"
    hook_dir.mkdir()
    victim: dict = {}

    def kill_when_stalled() -> None:
        path = hook_dir / "victim.pid"
        deadline = time.monotonic() + 180
        while not path.exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        victim["pid"] = int(path.read_text())
        os.kill(victim["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_when_stalled, daemon=True)
    killer.start()
    params = kit.label_params(small_world, campaign, runner="ray", ray_address=ray_cluster,
                              ray_init_kwargs=hooks(hook_dir, mode="kill"))
    t0 = time.perf_counter()
    s = label_campaign(**params)
    killer.join(timeout=5)
    print(f"\nray: {s['images']} images over {len(s['workers'])} worker processes in "
          f"{time.perf_counter() - t0:.1f} s, worker {victim.get('pid')} killed mid-shard")
    assert "pid" in victim, "no worker reached the hook point"
    assert (s["shards"], s["shards_labeled"], s["failed"]) == (12, 12, [])
    assert_equals_reference(kit, campaign, reference_campaign)
    # 2 logical GPUs, 1 per shard: two shards at a time, in two worker processes (the killed one not counted).
    pids = {r["pid"] for r in s["shard_results"]}
    assert len(pids) >= 2 and os.getpid() not in pids and victim["pid"] not in pids
    # Every shard labelled and committed exactly once, the killed one included.
    assert sorted(r["shard_id"] for r in s["shard_results"]) == list(range(12))
    assert commits(hook_dir) == Counter(range(12))
    # Models were built once per worker process and reused for its other shards.
    per_pid = Counter(r["pid"] for r in s["shard_results"])
    assert max(per_pid.values()) >= 2
    assert all(r["model_loads"] == 1 for r in s["shard_results"])

    # A rerun submits nothing: every shard is done.
    s2 = label_campaign(**params)
    assert (s2["shards_labeled"], s2["shards_skipped"], s2["shard_results"]) == (0, 12, [])
    assert commits(hook_dir) == Counter(range(12))


def test_evaluate_on_ray_one_task_per_segmenter_merges_into_the_same_reports(prefect_api, ray_cluster, eval_world,
                                                                              tmp_path):
    """`evaluate` with runner="ray": one task per (benchmark, segmenter), results merged into results.json and
    results.md beside what `out` already held; the metrics equal a local combined run's."""
    import json

    from flows.evaluate_flow import evaluate_flow
    from stages.evaluate import evaluate

    common = dict(dataset="custom", data_root=str(eval_world), models="maskclip,stage1", preset="oracle",
                  device="cpu")
    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    evaluate(out=str(local_out), progress=False, **common)
    local = json.loads((local_out / "results.json").read_text())
    key = next(iter(local["results"]))
    # An earlier report in `out` (another benchmark's column) must survive the merge.
    ray_out.mkdir()
    earlier = {"format": "fmbseg-eval", "results": {"custom:earlier": local["results"][key]}}
    (ray_out / "results.json").write_text(json.dumps(earlier))

    result = evaluate_flow(out=str(ray_out), runner="ray", ray_address=ray_cluster,
                           ray_init_kwargs={"_node_ip_address": HOST}, **common)
    assert sorted(result) == ["maskclip", "stage1"]
    merged = json.loads((ray_out / "results.json").read_text())
    assert sorted(merged["results"]) == sorted([key, "custom:earlier"])
    for model in ("maskclip", "stage1"):
        got, want = merged["results"][key][model], local["results"][key][model]
        for field in ("mIoU", "mAcc", "aAcc", "IoU", "Acc", "images"):
            assert got[field] == want[field], (model, field)
    md = (ray_out / "results.md").read_text()
    assert f"| {key} |" in md.splitlines()[2] and "custom:earlier" in md
    assert "| maskclip |" in md and "| stage1 |" in md


def test_cli_label_runner_ray(kit, prefect_api, ray_cluster, eval_world, tmp_path, capsys):
    """`fmbseg label --runner ray --ray-address ADDR` labels like `fmbseg label`; bad combinations exit 2."""
    from flows.cli import main

    base = ["label", "--images", str(eval_world / "images"), "--vocab", str(eval_world / "classes.txt"),
            "--preset", "oracle", "--shard-size", "1", "--device", "cpu", "--no-progress"]
    assert main(base + ["--campaign", str(tmp_path / "local")]) == 0
    capsys.readouterr()
    assert main(base + ["--campaign", str(tmp_path / "ray"), "--runner", "ray", "--ray-address", ray_cluster,
                        "--gpus-per-shard", "1"]) == 0
    out = capsys.readouterr().out
    assert "runner ray" in out and "3 labelled" in out
    assert kit.sorted_masks(tmp_path / "ray").equals(kit.sorted_masks(tmp_path / "local"))
    assert main(base + ["--campaign", str(tmp_path / "x"), "--runner", "ray", "--world-size", "2"]) == 2
    assert main(base + ["--campaign", str(tmp_path / "x"), "--runner", "ray", "--gpus-per-shard", "-1"]) == 2
    assert "--gpus-per-shard must be >= 0" in capsys.readouterr().err


def test_label_campaign_ray_deployment_is_registered(prefect_server, deployed):
    """prefect.yaml's `label-campaign/ray`: runner ray, joining the running cluster."""
    from prefect import get_client

    from flows.server import client_settings

    with client_settings(prefect_server.api_url, prefect_server.home), get_client(sync_client=True) as client:
        d = client.read_deployment_by_name("label-campaign/ray")
    assert d.work_pool_name == deployed
    assert d.parameters == {"runner": "ray", "ray_address": "auto"}
    assert "ray_address" in d.parameter_openapi_schema["properties"]


def test_pipeline_passes_the_ray_settings_to_labeling_and_evaluation(prefect_api, monkeypatch, tmp_path):
    """`fmbseg-pipeline` with runner="ray": labeling and evaluation get the Ray settings (the stages themselves
    are covered above; here they are stand-ins recording their arguments)."""
    import flows.pipeline as pipeline

    calls: dict = {}
    monkeypatch.setattr(pipeline, "label_campaign", lambda **kw: calls.setdefault("label", kw) and {"ok": 1})
    monkeypatch.setattr(pipeline, "train_alignment_flow",
                        lambda **kw: calls.setdefault("train", kw) and str(tmp_path / "c/train/h/model.pt"))
    monkeypatch.setattr(pipeline, "evaluate_flow", lambda **kw: calls.setdefault("evaluate", kw) and {})
    ray = dict(runner="ray", ray_address="auto", ray_init_kwargs={"runtime_env": {"working_dir": "."}})
    pipeline.fmbseg_pipeline(images="imgs", vocab="a,b", campaign=str(tmp_path / "c"), eval_dataset="custom",
                             eval_data_root="eval", gpus_per_shard=0.5, cpus_per_shard=3, **ray)
    for key, value in ray.items():
        assert calls["label"][key] == value and calls["evaluate"][key] == value
    assert (calls["label"]["gpus_per_shard"], calls["label"]["cpus_per_shard"]) == (0.5, 3)
    assert (calls["evaluate"]["gpus_per_task"], calls["evaluate"]["cpus_per_task"]) == (0.5, 3)
