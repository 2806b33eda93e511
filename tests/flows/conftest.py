"""Shared fixtures of the flow tests: ONE Prefect server per test session (a real `prefect server start` on
127.0.0.1 with its own PREFECT_HOME in a temporary directory), the deployments of prefect.yaml on a `process`
work pool, small synthetic worlds, and a reference campaign labeled without interruption.

Every process started here (server, workers, the flow runs they spawn) is killed with its whole tree in the
fixtures' finalizers.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pyarrow as pa
import pytest

from flows.server import LocalServer, client_settings, start_server, stop_process, tail

REPO = Path(__file__).resolve().parents[2]
POOL = "fmbseg"  # prefect.yaml's own pool name: the session server is private to the tests
# Small images (Stage 1 upscales them to CLIP's crop size anyway): a shard of one image takes ~0.3 s on CPU.
SMALL_SIZES = ((96, 128), (128, 96), (112, 144))
# Training settings small enough for tests: one epoch at 112 px (8 x 8 DINO patches).
FAST_TRAIN = {"epochs": 1, "train_size": 112, "batch_size": 4}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> LocalServer:
    server = start_server(tmp_path_factory.mktemp("prefect-home"))
    try:
        yield server
    finally:
        from flows.server import flush_prefect_logs

        flush_prefect_logs()  # ship this process's last flow logs before the server goes away
        server.stop()


@pytest.fixture
def prefect_api(prefect_server):
    """Point this process's Prefect client (in-process flow runs, artifact reads) at the session server."""
    with client_settings(prefect_server.api_url, prefect_server.home):
        yield prefect_server


@pytest.fixture(scope="session")
def deployed(prefect_server) -> str:
    """`prefect --no-prompt deploy --all` from the repository's prefect.yaml, exactly as a user types it (no
    FMBSEG_WORK_POOL needed), onto a fresh process pool named `fmbseg`; -> the pool name."""
    prefect_server.create_pool(POOL, cwd=REPO)
    env = prefect_server.env()
    env.pop("FMBSEG_WORK_POOL", None)
    res = prefect_server.cli("--no-prompt", "deploy", "--all", cwd=REPO, env=env)
    assert "fmbseg-pipeline/demo" in res.stdout, res.stdout[-3000:]
    return POOL


@pytest.fixture
def start_worker(prefect_server, deployed, tmp_path) -> Callable[..., subprocess.Popen]:
    """Start workers on the test pool (logs under tmp_path); all are killed with their trees at teardown."""
    started: list[subprocess.Popen] = []

    def start(name: str, limit: int | None = None) -> subprocess.Popen:
        proc = prefect_server.start_worker(deployed, cwd=REPO, log=tmp_path / f"{name}.log", name=name, limit=limit)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        stop_process(proc, timeout=5)
        if proc in prefect_server.workers:
            prefect_server.workers.remove(proc)


def write_small_world(path: Path, n: int, seed: int) -> Path:
    from fmbseg.testing.world import write_world

    write_world(path, n, seed=seed, sizes=SMALL_SIZES)
    return path


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """12 small training images (`custom` layout: images/, annotations/, classes.txt)."""
    return write_small_world(tmp_path_factory.mktemp("world") / "train", 12, seed=3)


@pytest.fixture(scope="session")
def eval_world(tmp_path_factory) -> Path:
    """3 small evaluation images, disjoint from `small_world`."""
    return write_small_world(tmp_path_factory.mktemp("world") / "eval", 3, seed=4)


def label_params(world: Path, campaign: Path, **extra) -> dict:
    return {"images": str(world / "images"), "vocab": str(world / "classes.txt"), "campaign": str(campaign),
            "preset": "oracle", "shard_size": 1, "device": "cpu", **extra}


@pytest.fixture(scope="session")
def reference_campaign(small_world, tmp_path_factory) -> Path:
    """`small_world` labeled in one uninterrupted run (the stage directly, no Prefect): the expected rows."""
    from stages.label import LabelConfig, run_label

    campaign = tmp_path_factory.mktemp("reference") / "campaign"
    p = label_params(small_world, campaign)
    run_label(LabelConfig(**p), progress=False)
    return campaign


def sorted_masks(campaign: Path) -> pa.Table:
    """Every committed `masks` row of a campaign, in (image_id, mask_id) order."""
    from storage.reader import CampaignReader

    table = CampaignReader(str(campaign)).masks()
    return table.sort_by([("image_id", "ascending"), ("mask_id", "ascending")])


def shard_files(campaign: Path) -> dict[str, dict[str, list[str]]]:
    """{table: {shard dir: visible file names}} of `images/` and `masks/` (hidden temporaries left out)."""
    out = {}
    for table in ("images", "masks"):
        out[table] = {d.name: sorted(f.name for f in d.iterdir() if not f.name.startswith("."))
                      for d in sorted((campaign / table).iterdir()) if d.is_dir()}
    return out


def run_deployment(server: LocalServer, name: str, params: dict, watch: bool = True,
                   timeout: int = 240) -> str:
    """`prefect deployment run NAME --params JSON [--watch]`; -> the flow run id."""
    args = ["deployment", "run", name, "--params", json.dumps(params)]
    if watch:
        args += ["--watch", "--watch-interval", "1", "--watch-timeout", str(timeout)]
    res = server.cli(*args, cwd=REPO, timeout=timeout + 30, check=False)
    out = res.stdout + res.stderr
    run_id = None
    for line in out.splitlines():
        if "UUID:" in line:
            run_id = line.split("UUID:")[1].strip().split()[0]
    assert res.returncode == 0 and run_id, f"deployment run failed ({res.returncode}):\n{out[-4000:]}"
    return run_id


def flow_run_state(server: LocalServer, run_id: str) -> str:
    from prefect import get_client

    with client_settings(server.api_url, server.home), get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state.type.value


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.2,
             logs: list[Path] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                 + "\n".join(f"--- {p}\n{tail(p)}" for p in logs))
        time.sleep(poll)


def done_markers(campaign: Path) -> dict[str, float]:
    """{done marker name: mtime} of a campaign."""
    d = campaign / "done"
    return {p.name: p.stat().st_mtime for p in d.glob("*.json")} if d.is_dir() else {}


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The helpers above, for test modules (conftest is not importable as a module under every runner)."""
    return SimpleNamespace(
        REPO=REPO, POOL=POOL, FAST_TRAIN=FAST_TRAIN, write_small_world=write_small_world, label_params=label_params,
        sorted_masks=sorted_masks, shard_files=shard_files, run_deployment=run_deployment,
        flow_run_state=flow_run_state, wait_for=wait_for, done_markers=done_markers,
    )
