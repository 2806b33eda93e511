"""`fmbseg relabel` (stages/relabel.py): a campaign relabelled with a new vocabulary from its relabel store equals a
full `fmbseg label` with that vocabulary on the same images — Parquet tables read back with pyarrow, label maps
read back with zarr — with the oracle and the tiny preset; old campaigns get the clear error; relabel resumes after
an interruption; the store is checked by `fmbseg verify` like every other committed file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from PIL import Image

from fmbseg.testing.palette import PALETTE_RGB, palette_index
from fmbseg.testing.world import write_world
from stages.label import LabelConfig, run_label
from stages.relabel import RelabelConfig, RelabelUnavailable, relabel_shard, run_relabel
from storage import faults
from storage.shard_writer import ShardDamaged
from storage.verify import verify_campaign

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SOURCE_VOCAB = "red,green,blue,yellow,gray"
# added (orange, cyan), removed (green, gray), renamed (`crimson: red` keeps red's text, `azure` is a new word)
NEW_VOCABS = {
    "added": "red,green,blue,yellow,gray,orange,cyan",
    "removed": "red,blue,yellow",
    "renamed": "crimson: red\nazure\nyellow\ngray: grey, gray\ngreen\n",
}


def _vocab(tmp: Path, spec: str) -> str:
    if "\n" not in spec:
        return spec
    path = tmp / "vocab.txt"
    path.write_text(spec)
    return str(path)


def label(world: Path, campaign: Path, vocab: str, preset: str, **kw) -> dict:
    cfg = LabelConfig(images=str(world / "images"), vocab=vocab, campaign=str(campaign), preset=preset,
                      shard_size=2, device="cpu", **kw)
    return run_label(cfg, progress=False)


def assert_same_campaign(a: Path, b: Path) -> None:
    """Everything a user reads from a campaign: campaign.json, shard lists, the images and masks tables (pyarrow,
    with their schema metadata), every label group (zarr arrays and attributes), the markers' counts."""
    assert (a / "campaign.json").read_bytes() == (b / "campaign.json").read_bytes()
    lists = sorted(p.name for p in (a / "shards").iterdir())
    assert lists == sorted(p.name for p in (b / "shards").iterdir())
    for name in lists:
        assert (a / "shards" / name).read_bytes() == (b / "shards" / name).read_bytes()
    for table in ("images", "masks"):
        ta, tb = pq.read_table(a / table), pq.read_table(b / table)
        assert ta.schema.equals(tb.schema, check_metadata=True)
        assert ta.num_rows == tb.num_rows and ta.equals(tb), table
    groups = sorted(p.name for p in (a / "labels.zarr").iterdir() if p.is_dir())
    assert groups == sorted(p.name for p in (b / "labels.zarr").iterdir() if p.is_dir()) and groups
    for g in groups:
        za, zb = zarr.open_group(a / "labels.zarr" / g, mode="r"), zarr.open_group(b / "labels.zarr" / g, mode="r")
        assert dict(za.attrs) == dict(zb.attrs)
        for arr in ("label", "hw"):
            assert dict(za[arr].attrs) == dict(zb[arr].attrs)
            np.testing.assert_array_equal(za[arr][:], zb[arr][:])
    import json

    for m in sorted((a / "done").iterdir()):
        ma, mb = json.loads(m.read_text()), json.loads((b / "done" / m.name).read_text())
        for k in ("seconds", "attempt", "files", "outputs"):  # run-specific, and the relabel store's hashes
            ma.pop(k), mb.pop(k)
        assert ma == mb


@pytest.fixture(scope="module", params=["oracle", "tiny"])
def source(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"relabel-{request.param}")
    write_world(base / "w", 3, seed=5, sizes=((96, 128), (120, 80)), formats=("png", "jpg"))
    s = label(base / "w", base / "c", SOURCE_VOCAB, request.param, relabel_store=True)
    assert (s["ok"], s["shards_labelled"]) == (3, 2)
    return base, request.param


@pytest.mark.parametrize("change", sorted(NEW_VOCABS))
def test_relabel_equals_a_full_label_run(source, change, tmp_path):
    base, preset = source
    vocab = _vocab(tmp_path, NEW_VOCABS[change])
    s = run_relabel(RelabelConfig(campaign=str(base / "c"), vocab=vocab, out=str(tmp_path / "c2"), device="cpu"),
                    progress=False)
    assert (s["shards_relabelled"], s["ok"], s["failed"]) == (2, 3, 0) and s["masks"] > 0
    assert s["timings"]["sam_encoder"] == 0.0  # no image encoder ran
    label(base / "w", tmp_path / "full", vocab, preset, relabel_store=True)
    assert_same_campaign(tmp_path / "c2", tmp_path / "full")
    assert verify_campaign(str(tmp_path / "c2"))["clean"]
    # C2 keeps a relabel store itself: relabelling it back gives the source campaign's outputs.
    run_relabel(RelabelConfig(campaign=str(tmp_path / "c2"), vocab=SOURCE_VOCAB, out=str(tmp_path / "back"),
                              device="cpu"), progress=False)
    assert_same_campaign(tmp_path / "back", base / "c")


def _halves(path: Path, left: str, right: str, hw=(96, 128)) -> None:
    img = np.zeros((*hw, 3), np.uint8)
    img[:, : hw[1] // 2] = PALETTE_RGB[palette_index(left)]
    img[:, hw[1] // 2 :] = PALETTE_RGB[palette_index(right)]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def test_image_without_a_sam_pass_gets_one_when_a_class_is_now_detected(tmp_path):
    # Two crops, one mostly red and one mostly blue: with 2 votes needed, red+blue detects nothing (no SAM pass in
    # the source campaign); red+green makes both crops vote red.
    world = tmp_path / "w"
    _halves(world / "images" / "halves.png", "red", "blue")
    write_world(tmp_path / "more", 1, seed=2, sizes=((96, 128),), formats=("png",))
    (world / "images" / "world.png").write_bytes((tmp_path / "more" / "images" / "world_0000.png").read_bytes())
    over = {"stage1": {"min_crop_votes": 2}}
    s = label(world, tmp_path / "c", "red,blue", "oracle", relabel_store=True, **over)
    assert s["ok"] == 2
    from storage.reader import CampaignReader

    n_masks = {r["image_id"]: r["n_masks"] for r in CampaignReader(tmp_path / "c").images().to_pylist()}
    assert n_masks["halves.png"] == 0
    r = run_relabel(RelabelConfig(campaign=str(tmp_path / "c"), vocab="red,green", out=str(tmp_path / "c2"),
                                  device="cpu"), progress=False)
    assert r["new_sam_passes"] >= 1 and r["timings"]["sam_encoder"] > 0
    label(world, tmp_path / "full", "red,green", "oracle", relabel_store=True, **over)
    assert_same_campaign(tmp_path / "c2", tmp_path / "full")
    n_masks = {r["image_id"]: r["n_masks"] for r in CampaignReader(tmp_path / "c2").images().to_pylist()}
    assert n_masks["halves.png"] > 0


def test_campaign_without_the_store_gets_the_clear_error(tmp_path):
    write_world(tmp_path / "w", 2, seed=1, sizes=((96, 128),), formats=("png",))
    label(tmp_path / "w", tmp_path / "old", SOURCE_VOCAB, "oracle")
    with pytest.raises(RelabelUnavailable, match=r"fmbseg >= 0\.2\.0 with `fmbseg label --relabel-store`"):
        run_relabel(RelabelConfig(campaign=str(tmp_path / "old"), vocab="red", out=str(tmp_path / "c2"),
                                  device="cpu"), progress=False)
    assert not (tmp_path / "c2").exists()
    # Asking for the store on a campaign labelled without it is a changed config (every shard or none keeps it).
    with pytest.raises(ValueError, match="relabel_store: false -> true"):
        label(tmp_path / "w", tmp_path / "old", SOURCE_VOCAB, "oracle", relabel_store=True)
    # --overwrite relabels it from scratch with the store; a later run without the flag keeps writing it.
    label(tmp_path / "w", tmp_path / "old", SOURCE_VOCAB, "oracle", relabel_store=True, overwrite=True)
    assert (tmp_path / "old" / "relabel.zarr" / "000000" / "zarr.json").is_file()
    label(tmp_path / "w", tmp_path / "old", SOURCE_VOCAB, "oracle")
    import json

    assert json.loads((tmp_path / "old" / "campaign.json").read_text())["relabel_store"] is True
    s = run_relabel(RelabelConfig(campaign=str(tmp_path / "old"), vocab="red", out=str(tmp_path / "c2"),
                                  device="cpu"), progress=False)
    assert s["ok"] == 2
    # --overwrite with another config and without the flag drops the store with the other outputs.
    label(tmp_path / "w", tmp_path / "old", "red,blue", "oracle", overwrite=True)
    assert not (tmp_path / "old" / "relabel.zarr").exists()
    assert "relabel_store" not in json.loads((tmp_path / "old" / "campaign.json").read_text())


def test_relabel_resumes_after_an_interruption(tmp_path, monkeypatch):
    write_world(tmp_path / "w", 3, seed=7, sizes=((96, 128), (120, 80)), formats=("png",))
    label(tmp_path / "w", tmp_path / "c", SOURCE_VOCAB, "oracle", relabel_store=True)
    cfg = RelabelConfig(campaign=str(tmp_path / "c"), vocab="red,cyan,yellow", out=str(tmp_path / "c2"),
                        device="cpu")
    staged = []
    real = faults.checkpoint

    def crash_on_second_shard(name):
        if name == "staged":
            staged.append(name)
            if len(staged) == 2:
                raise KeyboardInterrupt("killed after staging shard 1")
        real(name)

    monkeypatch.setattr(faults, "checkpoint", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run_relabel(cfg, progress=False)
    monkeypatch.setattr(faults, "checkpoint", real)
    assert sorted(p.name for p in (tmp_path / "c2" / "done").iterdir()) == ["000000.json"]
    s = run_relabel(cfg, progress=False)
    assert (s["shards_skipped"], s["shards_relabelled"]) == (1, 1)
    label(tmp_path / "w", tmp_path / "full", "red,cyan,yellow", "oracle", relabel_store=True)
    assert_same_campaign(tmp_path / "c2", tmp_path / "full")
    report = verify_campaign(str(tmp_path / "c2"), repair=True, attempts_grace_s=0)
    assert report["clean"] and [p.problem for p in report["problems"]] == ["abandoned attempt (a killed or losing writer)"]


def test_the_store_is_verified_like_every_committed_file(tmp_path):
    write_world(tmp_path / "w", 2, seed=3, sizes=((96, 128),), formats=("png",))
    label(tmp_path / "w", tmp_path / "c", SOURCE_VOCAB, "oracle", relabel_store=True)
    report = verify_campaign(str(tmp_path / "c"))
    assert report["clean"]
    chunk = sorted((tmp_path / "c" / "relabel.zarr" / "000000" / "dense" / "values").rglob("c/*"))[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = verify_campaign(str(tmp_path / "c"))
    assert not report["clean"]
    assert any("relabel.zarr/000000/dense/values" in p.path for p in report["problems"])
    with pytest.raises(ShardDamaged, match="relabel.zarr/000000/dense/values"):
        run_relabel(RelabelConfig(campaign=str(tmp_path / "c"), vocab="red", out=str(tmp_path / "c2"),
                                  device="cpu"), progress=False)
    # --repair drops the damaged shard (no staged copy); the next label redoes it with its store.
    assert verify_campaign(str(tmp_path / "c"), repair=True)["clean"]
    label(tmp_path / "w", tmp_path / "c", SOURCE_VOCAB, "oracle", relabel_store=True)
    assert verify_campaign(str(tmp_path / "c"))["clean"]
    assert relabel_shard(str(tmp_path / "c"), str(tmp_path / "c2"), 0, "cpu")["ok"] == 2


@pytest.mark.parametrize("preset,device_resize", [("oracle", None), ("tiny", True)])
def test_serial_and_pipelined_label_keep_the_same_store(tmp_path, one_torch_thread, preset, device_resize):
    """Also with the resizes on the model's device and the real SAM adapter's automatic masks (tiny preset): the
    kept features, embeddings and packed 1.2 masks are those of the serial loop."""
    from stages.label_pipeline import ExecutionConfig

    kw = {"stage1": {"points_per_side": 4}} if preset == "tiny" else {}
    write_world(tmp_path / "w", 3, seed=4, sizes=((96, 128), (120, 80)), formats=("png",))
    label(tmp_path / "w", tmp_path / "pipe", SOURCE_VOCAB, preset, relabel_store=True,
          execution=ExecutionConfig(device_resize=device_resize), **kw)
    label(tmp_path / "w", tmp_path / "serial", SOURCE_VOCAB, preset, relabel_store=True,
          execution=ExecutionConfig(pipeline=False), **kw)
    assert_same_campaign(tmp_path / "pipe", tmp_path / "serial")
    files = sorted(p.relative_to(tmp_path / "pipe") for p in (tmp_path / "pipe" / "relabel.zarr").rglob("*")
                   if p.is_file())
    assert len(files) > 10
    assert files == sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial" / "relabel.zarr")
                           .rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "pipe" / f).read_bytes() == (tmp_path / "serial" / f).read_bytes(), f
