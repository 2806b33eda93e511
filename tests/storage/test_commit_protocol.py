"""The shard commit protocol under races and kill -9 (issue 13 item 1, issue 10 items 2 and 5), with real writer
processes (tests/storage/commit_writer.py → `commit_shard`) paused or killed at chosen points of the real code path
(storage/faults.py): no test depends on timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pytest

from storage.campaign import CampaignManifest, write_manifest
from storage.fs import CampaignRoot
from storage.layout import ATTEMPTS_DIR, done_path
from storage.markers import read_done
from storage.planning import ImageEntry, append_shards
from storage.reader import CampaignReader
from storage.shard_writer import ShardDamaged, check_shard, commit_shard
from storage.verify import verify_campaign

REPO = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).with_name("commit_writer.py")
VOCAB = ["red", "green", "blue"]
POINTS = ["staged", "committed", "publishing", "published"]


def make_campaign(path: Path, n_images: int = 4, shard_size: int = 2) -> CampaignRoot:
    root = CampaignRoot(path)
    write_manifest(root, CampaignManifest(stage1={"a": 1}, vocabulary={"names": VOCAB, "synonyms": [[], [], []]},
                                          preset="oracle", models={}, seed=0, code_version="t",
                                          inputs={"images": "/in", "root": "/in"}))
    append_shards(root, [ImageEntry(f"im{i}.png", f"/in/im{i}.png") for i in range(n_images)], shard_size, "/in")
    return root


def writer(campaign: Path, shard: int, tag: int, fault_dir: Path, pause: str = "", kill: str = "") -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               FMBSEG_FAULT_DIR=str(fault_dir), FMBSEG_FAULT_PAUSE=pause, FMBSEG_FAULT_KILL=kill)
    return subprocess.Popen([sys.executable, str(WRITER), str(campaign), str(shard), str(tag)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_reached(fault_dir: Path, point: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (fault_dir / f"{point}.reached").exists():
        if proc.poll() is not None:
            raise AssertionError(f"writer exited ({proc.returncode}) before {point}: {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"writer never reached {point}"
        time.sleep(0.01)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def plain_readers(campaign: Path) -> dict[str, set]:
    """(image_id, mask_id, score) of every row of masks/ as pandas, duckdb and polars read the folder."""
    masks = campaign / "masks"
    if not masks.exists():
        return {"pandas": set(), "duckdb": set(), "polars": set()}
    p = pd.read_parquet(masks)
    d = duckdb.sql(f"SELECT image_id, mask_id, score FROM read_parquet('{masks}/**/*.parquet', "
                   "hive_partitioning=true)").fetchall()
    q = pl.read_parquet(f"{masks}/**/*.parquet", hive_partitioning=True)
    return {"pandas": set(zip(p.image_id, p.mask_id, p.score)), "duckdb": set(d),
            "polars": set(zip(q["image_id"], q["mask_id"], q["score"]))}


def rows_of(reader_masks) -> set:
    t = reader_masks
    return set(zip(t.column("image_id").to_pylist(), t.column("mask_id").to_pylist(), t.column("score").to_pylist()))


def assert_one_complete_shard(campaign: Path, shard: int, tag: int) -> None:
    """Exactly the writer `tag`'s shard: marker, every file matching it, no staging left, readers agree."""
    root = CampaignRoot(campaign)
    marker = read_done(root, shard)
    assert marker.code_version == f"writer-{tag}"
    assert check_shard(root, marker) == []
    assert not (campaign / ATTEMPTS_DIR / f"{shard:06d}").exists()
    reader = CampaignReader(campaign)
    masks = reader.masks([shard])
    assert set(masks.column("score").to_pylist()) == {float(tag)}
    group = reader.labels(shard)
    assert {int(w) for w in group.hw[:, 1]} == {24 + tag}
    assert group.image_ids == reader.images([shard]).column("image_id").to_pylist()
    assert verify_campaign(root, attempts_grace_s=0)["problems"] == []


@pytest.mark.parametrize("point", POINTS)
def test_two_concurrent_writers_of_one_shard_end_with_one_complete_shard(tmp_path, point):
    """Writer 1 is held at `point`; writer 2 runs the whole protocol meanwhile; then writer 1 goes on."""
    campaign, faults = tmp_path / "c", tmp_path / "faults"
    faults.mkdir()
    make_campaign(campaign)
    first = writer(campaign, 1, 1, faults, pause=point)
    wait_reached(faults, point, first)
    second = finish(writer(campaign, 1, 2, tmp_path))
    (faults / f"{point}.go").touch()
    first_result = finish(first)
    # Before its marker, writer 1 has committed nothing: writer 2 wins. From the marker on, writer 1 owns the
    # shard and writer 2 discards its attempt.
    winner = 2 if point == "staged" else 1
    assert (first_result["won"], second["won"]) == (winner == 1, winner == 2)
    assert first_result["attempt"] == second["attempt"]
    assert_one_complete_shard(campaign, 1, winner)
    assert all(rows == {(f"im{i}.png", j, float(winner)) for i in (2, 3) for j in (0, 1)}
               for rows in plain_readers(campaign).values())


@pytest.mark.parametrize("point", POINTS)
def test_kill9_at_each_point_then_recover(tmp_path, point):
    """Shard 0 is committed; the writer of shard 1 is killed at `point`. Plain Parquet readers (pandas, duckdb,
    polars) see only committed rows at every moment; verify --repair (or a rerun) leaves one complete shard."""
    campaign = tmp_path / "c"
    root = make_campaign(campaign)
    sys.path.insert(0, str(WRITER.parent))
    from commit_writer import main as commit_in_process

    commit_in_process(str(campaign), 0, 5)  # the same code path as the writer processes, in this process
    shard0 = {(f"im{i}.png", j, 5.0) for i in (0, 1) for j in (0, 1)}
    doomed = writer(campaign, 1, 1, tmp_path, kill=point)
    doomed.communicate(timeout=60)
    assert doomed.returncode == -9

    committed = point != "staged"
    published_masks = point == "published"  # images/ is published first, masks/ after labels.zarr
    shard1 = {(f"im{i}.png", j, 1.0) for i in (2, 3) for j in (0, 1)}
    for name, rows in plain_readers(campaign).items():
        assert rows == (shard0 | shard1 if published_masks else shard0), name
    reader = CampaignReader(campaign)
    assert sorted(reader.done()) == ([0, 1] if committed else [0])
    assert rows_of(reader.masks()) == (shard0 | shard1 if committed else shard0)  # staged copy until published

    report = verify_campaign(root, attempts_grace_s=0)
    assert not report["clean"] and report["problems"]
    assert verify_campaign(root, repair=True, attempts_grace_s=0)["clean"]
    if committed:
        assert_one_complete_shard(campaign, 1, 1)
    else:
        assert not (campaign / ATTEMPTS_DIR).exists() or not any((campaign / ATTEMPTS_DIR).iterdir())
        assert finish(writer(campaign, 1, 2, tmp_path))["won"]
        assert_one_complete_shard(campaign, 1, 2)
    for name, rows in plain_readers(campaign).items():
        assert len(rows) == 8, name
    assert_one_complete_shard(campaign, 0, 5)


def test_object_store_commit_is_exclusive_too():
    """The same protocol on a non-local fsspec filesystem (memory://): the second attempt loses, its files go."""
    sys.path.insert(0, str(WRITER.parent))
    from commit_writer import shard_content

    root = make_campaign_url("memory://commit-proto")
    h = CampaignReader(root.url).stage1_hash
    a = commit_shard(root, 0, h, *shard_content(root, 0, 1), failure_reasons={}, seconds=0, code_version="writer-1")
    b = commit_shard(root, 0, h, *shard_content(root, 0, 2), failure_reasons={}, seconds=0, code_version="writer-2")
    assert b.attempt == a.attempt and b.code_version == "writer-1"
    assert root.find(ATTEMPTS_DIR) == [] and check_shard(root, a) == []
    assert set(CampaignReader(root.url).masks().column("score").to_pylist()) == {1.0}
    assert root.exists(done_path(0))


def make_campaign_url(url: str) -> CampaignRoot:
    root = CampaignRoot(url)
    root.remove("", recursive=True)
    write_manifest(root, CampaignManifest(stage1={"a": 1}, vocabulary={"names": VOCAB, "synonyms": [[], [], []]},
                                          preset="oracle", models={}, seed=0, code_version="t",
                                          inputs={"images": "/in", "root": "/in"}))
    append_shards(root, [ImageEntry(f"im{i}.png", f"/in/im{i}.png") for i in range(2)], 2, "/in")
    return root


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on 127.0.0.1 (a real HTTP endpoint s3fs talks to, not a mocked client)."""
    import socket

    pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=url, aws_access_key_id="k", aws_secret_access_key="s",
                     region_name="us-east-1").create_bucket(Bucket="proto")
        yield url
    finally:
        proc.kill()
        proc.wait()


def test_commit_protocol_on_s3(s3_server, monkeypatch):
    """On S3 the commit point is one conditional PUT of the marker: a second attempt's PUT is refused (412), it
    discards its staged objects, and a damaged part is caught and repaired exactly as locally."""
    for k, v in dict(AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_ENDPOINT_URL=s3_server,
                     AWS_DEFAULT_REGION="us-east-1").items():
        monkeypatch.setenv(k, v)
    sys.path.insert(0, str(WRITER.parent))
    from commit_writer import shard_content

    root = make_campaign_url("s3://proto/c")
    assert root.create_exclusive("x.json", b"1") and not root.create_exclusive("x.json", b"2")
    assert root.read_bytes("x.json") == b"1"
    h = CampaignReader(root.url).stage1_hash
    a = commit_shard(root, 0, h, *shard_content(root, 0, 1), failure_reasons={}, seconds=0, code_version="writer-1")
    b = commit_shard(root, 0, h, *shard_content(root, 0, 2), failure_reasons={}, seconds=0, code_version="writer-2")
    assert b.attempt == a.attempt and root.find(ATTEMPTS_DIR) == [] and check_shard(root, a) == []
    assert set(CampaignReader(root.url).masks().column("score").to_pylist()) == {1.0}
    root.fs.rm(root.full("masks/shard=000000/part-0.parquet"))
    with pytest.raises(ShardDamaged, match="masks/shard=000000/part-0.parquet is missing"):
        CampaignReader(root.url).masks()
    assert verify_campaign(root, repair=True)["clean"] and CampaignReader(root.url).done() == {}
    c = commit_shard(root, 0, h, *shard_content(root, 0, 2), failure_reasons={}, seconds=0, code_version="writer-2")
    assert c.code_version == "writer-2" and verify_campaign(root)["problems"] == []
