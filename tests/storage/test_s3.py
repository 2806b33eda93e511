"""A campaign on S3, for real: moto's S3 server on 127.0.0.1 (a free port) started by the test, reached through
s3fs with an endpoint URL -- no mocked client. Label, status, train, and plain Parquet/Zarr readers reading the
campaign back through s3fs, as every node of a multi-node run would."""

from __future__ import annotations

import json
import socket

import pytest

from fmbseg.testing.world import write_world

HOST = "127.0.0.1"
BUCKET = "fmbseg-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's threaded S3 server on 127.0.0.1 with one bucket; -> the endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address=HOST, port=port, verbose=False)
    server.start()
    endpoint = f"http://{HOST}:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """Point every s3fs filesystem of this process at the moto server (fsspec's per-protocol defaults: what
    `FSSPEC_S3_ENDPOINT_URL` etc. set for other processes); -> an s3fs filesystem for reading back."""
    import fsspec
    import s3fs

    for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(var, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_endpoint, "key": "testing",
                                                   "secret": "testing"})
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret="testing", skip_instance_cache=True)
    s3fs.S3FileSystem.clear_instance_cache()


def test_campaign_on_s3_label_status_train_and_plain_readers(s3, s3_endpoint, tmp_path):
    import pandas as pd
    import pyarrow.parquet as pq
    import zarr

    from stages.label import LabelConfig, campaign_status, run_label
    from stages.train import TrainConfig, train_alignment
    from storage.reader import CampaignReader

    world = tmp_path / "world"
    write_world(world, 4, seed=5, sizes=((96, 128), (128, 96)))
    params = dict(images=str(world / "images"), vocab=str(world / "classes.txt"), preset="oracle", shard_size=2,
                  device="cpu")
    url = f"s3://{BUCKET}/campaigns/c1"
    local = tmp_path / "local"
    s = run_label(LabelConfig(campaign=url, **params), progress=False)
    run_label(LabelConfig(campaign=str(local), **params), progress=False)
    assert (s["shards"], s["shards_labelled"], s["images"], s["failed"]) == (2, 2, 4, 0)

    # The objects are in the bucket, read back by a separate s3fs client.
    from storage.layout import images_path, masks_path

    keys = {k[len(f"{BUCKET}/campaigns/c1/"):] for k in s3.find(f"{BUCKET}/campaigns/c1")}
    for rel in ("campaign.json", "done/000000.json", "done/000001.json", images_path(0), masks_path(1),
                "labels.zarr/zarr.json", "labels.zarr/000001/label/zarr.json"):
        assert rel in keys, (rel, sorted(keys))
    assert json.loads(s3.cat_file(f"{BUCKET}/campaigns/c1/done/000001.json"))["shard_id"] == 1

    # Rerun: nothing to do; status from the markers on S3.
    again = run_label(LabelConfig(campaign=url, **params), progress=False)
    assert (again["shards_labelled"], again["shards_skipped"]) == (0, 2)
    st = campaign_status(url)
    assert (st["shards_done"], st["shards_total"], st["images_ok"]) == (2, 2, 4)
    assert st["masks"] == campaign_status(str(local))["masks"]

    # Another node's writes are seen at once: here another client removes shard 1's marker (as if that shard's
    # commit had not happened yet); this process's s3fs must not answer from its cached listings.
    from flows.label_flow import pending_shards

    assert pending_shards(url, [0, 1]) == []
    s3.rm(f"{BUCKET}/campaigns/c1/done/000001.json")
    assert pending_shards(url, [0, 1]) == [1]  # what a Ray run on any node would submit
    st = campaign_status(url)
    assert (st["shards_done"], st["images_ok"]) == (1, 2)
    redo = run_label(LabelConfig(campaign=url, **params), progress=False)
    assert (redo["shards_labelled"], redo["shards_skipped"]) == (1, 1)
    assert campaign_status(url)["shards_done"] == 2

    # The campaign reader (masks, images, label maps) through s3fs equals the same campaign labelled locally.
    on_s3, here = CampaignReader(url), CampaignReader(str(local))
    key = [("image_id", "ascending"), ("mask_id", "ascending")]
    assert on_s3.masks().sort_by(key).equals(here.masks().sort_by(key))
    assert on_s3.images().sort_by("image_id").equals(here.images().sort_by("image_id"))
    for (sid_a, id_a, lab_a), (sid_b, id_b, lab_b) in zip(on_s3.iter_labels(), here.iter_labels()):
        assert (sid_a, id_a) == (sid_b, id_b) and (lab_a == lab_b).all()

    # Plain readers, given only the URL and the endpoint: pandas / pyarrow on the Parquet, zarr on the group.
    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}, "key": "testing",
            "secret": "testing"}
    masks_pd = pd.read_parquet(f"{url}/{masks_path(0)}", storage_options=opts)
    assert len(masks_pd) == pq.read_table(local / masks_path(0)).num_rows > 0
    group = zarr.open_group(f"{url}/labels.zarr/000000", mode="r", storage_options=opts)
    assert group["label"].shape[0] == 2

    # Train on the S3 campaign: the checkpoint lands in the bucket and loads back.
    ckpt = train_alignment(url, TrainConfig(epochs=1, train_size=112, batch_size=4, device="cpu"), progress=False)
    assert ckpt.startswith(f"s3://{BUCKET}/campaigns/c1/train/") and ckpt.endswith("/model.pt")
    assert s3.exists(ckpt) and s3.size(ckpt) > 0
    from fmbseg.checkpoint import load_checkpoint

    assert load_checkpoint(ckpt)["epoch"] == 1
