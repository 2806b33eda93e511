"""Parquet schemas, RLE round trips, the labels.zarr group, done markers and CampaignReader."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from pycocotools import mask as mask_utils

from storage.campaign import CampaignManifest, write_manifest
from storage.fs import CampaignRoot
from storage.labels import IGNORE, PackedLabels, open_label_group, write_label_group
from storage.markers import is_done, read_done, remove_done
from storage.planning import ImageEntry, append_shards
from storage.reader import CampaignReader
from storage.shard_writer import commit_shard
from storage.tables import (
    decode_rle,
    encode_masks,
    images_table,
    masks_table,
    table_to_parquet_bytes,
    table_vocabulary,
)

VOCAB = ["red", "green", "blue"]

# pycocotools 2.0.11 under numpy 2 warns on every decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_schemas_are_exactly_design_section5():
    t = images_table([{"image_id": "a.png", "path": "/a.png", "status": "ok", "height": 3, "width": 4, "n_masks": 1}], VOCAB)
    assert [(f.name, str(f.type)) for f in t.schema] == [
        ("image_id", "string"), ("path", "string"), ("status", "string"), ("error", "string"),
        ("height", "int32"), ("width", "int32"), ("n_masks", "int32"),
    ]
    m = masks_table({k: [] for k in ["image_id", "mask_id", "stage", "class_id", "class_name", "score", "sam_score",
                                      "area", "bbox", "height", "width", "rle", "selected"]}, VOCAB)
    assert [(f.name, str(f.type)) for f in m.schema] == [
        ("image_id", "string"), ("mask_id", "int32"), ("stage", "string"), ("class_id", "int32"),
        ("class_name", "string"), ("score", "float"), ("sam_score", "float"), ("area", "int64"),
        ("bbox", "fixed_size_list<item: float>[4]"), ("height", "int32"), ("width", "int32"), ("rle", "binary"),
        ("selected", "bool"),
    ]
    for table in (t, m):
        assert table.schema.metadata[b"fmbseg_schema_version"] == b"1"
        assert json.loads(table.schema.metadata[b"vocabulary"]) == VOCAB
        assert table_vocabulary(table) == VOCAB
    with pytest.raises(ValueError, match="status"):
        images_table([{"image_id": "a", "path": "a", "status": "maybe", "n_masks": 0}], VOCAB)
    with pytest.raises(ValueError, match="lacks columns"):
        masks_table({"image_id": []}, VOCAB)


def test_rle_area_bbox_against_hand_computed_values():
    masks = np.zeros((300, 7, 9), bool)  # > 255 masks: pycocotools' area overflow must be avoided
    masks[:, 2:5, 3:8] = True  # rows 2..4, cols 3..7 -> area 15, bbox (x=3, y=2, w=5, h=3)
    masks[1] = False
    masks[1, 6, 0] = True  # a single pixel in the bottom-left corner
    enc = encode_masks(masks)
    assert enc.area.dtype == np.int64 and enc.area[0] == 15 and enc.area[1] == 1 and enc.area[299] == 15
    np.testing.assert_array_equal(enc.bbox[0], [3, 2, 5, 3])
    np.testing.assert_array_equal(enc.bbox[1], [0, 6, 1, 1])
    for i in (0, 1, 299):
        np.testing.assert_array_equal(decode_rle(enc.counts[i], 7, 9), masks[i])
    assert encode_masks(np.zeros((0, 4, 4), bool)).counts == []


def _pycocotools_encode(masks: np.ndarray):
    """The reference: pycocotools on the Fortran-ordered uint8 stack (what `encode_masks` did before it was
    vectorised), area in chunks of 255 (pycocotools 2.0.11 overflows beyond)."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    area = np.concatenate([np.asarray(mask_utils.area(rles[i : i + 255]), np.int64) for i in range(0, len(rles), 255)])
    return [r["counts"] for r in rles], area, np.asarray(mask_utils.toBbox(rles), np.float32).reshape(-1, 4)


def _varied_mask_stacks():
    rng = np.random.default_rng(11)
    for h, w in [(1, 1), (1, 17), (23, 1), (2, 2), (37, 53), (64, 48), (31, 8)]:
        n = int(rng.integers(1, 9))
        yield f"noise {h}x{w}", rng.random((n, h, w)) < rng.random((n, 1, 1))
        yield f"sparse {h}x{w}", rng.random((n, h, w)) < 0.03
    full = np.ones((3, 9, 7), bool)
    full[1] = False  # an empty mask between two full ones
    yield "full and empty", full
    rows = np.zeros((2, 12, 10), bool)
    rows[0, 5, :] = True  # one row: every run is one pixel
    rows[1, 11, 2:5] = True  # bottom row
    rows[1, 0, 3:6] = True  # top row: runs continue from the column before -> toBbox spans every row
    yield "rows", rows
    big = np.zeros((2, 700, 900), bool)  # counts above 2^16 (4-character codes) and negative deltas
    big[0, 699, 899] = True
    big[1, 3, 0] = big[1, 650, 880] = big[1, 10:600, 400:420] = True
    yield "large counts", big
    yield "many masks", rng.random((300, 5, 6)) < 0.5
    yield "non-contiguous views", (rng.random((4, 40, 60)) < 0.5)[:, ::2, 1::3]


@pytest.mark.parametrize("as_list", [False, True], ids=["stack", "list"])
def test_encode_masks_is_byte_equal_to_pycocotools(as_list):
    for name, masks in _varied_mask_stacks():
        counts, area, bbox = _pycocotools_encode(masks)
        enc = encode_masks(list(masks) if as_list else masks)
        assert enc.counts == counts, name
        assert all(type(c) is bytes for c in enc.counts)
        assert enc.area.dtype == np.int64 and np.array_equal(enc.area, area), name
        assert enc.bbox.dtype == np.float32 and np.array_equal(enc.bbox, bbox), name
        h, w = masks.shape[1:]
        for c, m in zip(enc.counts, masks):
            assert np.array_equal(decode_rle(c, h, w), m), name
    with pytest.raises(ValueError, match="must all be"):
        encode_masks([np.zeros((4, 5), bool), np.zeros((5, 4), bool)])


def write_demo_campaign(url, n_images=5, shard_size=2):
    root = CampaignRoot(url)
    m = CampaignManifest(stage1={"a": 1}, vocabulary={"names": VOCAB, "synonyms": [[], [], []]}, preset="oracle",
                         models={}, seed=0, code_version="t")
    write_manifest(root, m)
    entries = [ImageEntry(f"im{i}.png", f"/in/im{i}.png") for i in range(n_images)]
    shard_ids, _ = append_shards(root, entries, shard_size)
    rng = np.random.default_rng(0)
    expected = {}
    for sid in shard_ids:
        rows, cols, packed = [], {k: [] for k in ["image_id", "mask_id", "stage", "class_id", "class_name", "score",
                                                  "sam_score", "area", "bbox", "height", "width", "rle", "selected"]}, PackedLabels()
        for e in entries[sid * shard_size:(sid + 1) * shard_size]:
            if e.image_id == "im3.png":
                rows.append({"image_id": e.image_id, "path": e.path, "status": "failed", "error": "truncated: x", "n_masks": 0})
                continue
            h, w = 20 + int(rng.integers(0, 30)), 20 + int(rng.integers(0, 30))
            masks = rng.random((2, h, w)) > 0.5
            enc = encode_masks(masks)
            label = np.where(masks[1], 1, np.where(masks[0], 0, IGNORE)).astype(np.uint16)
            expected[e.image_id] = label
            packed.add(e.image_id, label)
            rows.append({"image_id": e.image_id, "path": e.path, "status": "ok", "height": h, "width": w, "n_masks": 2})
            for j in range(2):
                for k, v in dict(image_id=e.image_id, mask_id=j, stage="1.1", class_id=j, class_name=VOCAB[j], score=0.5 + j,
                                 sam_score=0.9, area=enc.area[j], bbox=enc.bbox[j], height=h, width=w, rle=enc.counts[j],
                                 selected=True).items():
                    cols[k].append(v)
        commit_shard(root, sid, m.stage1_hash(), images_table(rows, VOCAB), masks_table(cols, VOCAB), packed,
                     failure_reasons={"truncated": 1} if any(r["status"] == "failed" for r in rows) else {},
                     seconds=0.1, code_version="t")
    return root, m, expected


@pytest.mark.parametrize("url", ["local", "memory://reader-c"])
def test_committed_campaign_reads_back(tmp_path, url):
    root, m, expected = write_demo_campaign(tmp_path / "c" if url == "local" else url)
    reader = CampaignReader(root.url)
    assert reader.shards() == [0, 1, 2] and list(reader.done()) == [0, 1, 2]
    images = reader.images()
    assert images.column("image_id").to_pylist() == [f"im{i}.png" for i in range(5)]
    assert images.column("status").to_pylist() == ["ok", "ok", "ok", "failed", "ok"]
    assert images.column("error").to_pylist()[3] == "truncated: x" and images.column("error").to_pylist()[0] is None
    masks = reader.masks()
    assert masks.num_rows == 8 and reader.masks(columns=["class_name"]).column_names == ["class_name"]
    got = {image_id: label for image_id, _, label in reader.iter_labels()}
    assert set(got) == set(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
    marker = read_done(root, 1)
    assert (marker.images, marker.ok, marker.failed, marker.masks) == (2, 1, 1, 2)
    assert marker.failure_reasons == {"truncated": 1} and marker.masks_per_class == {"green": 1, "red": 1}
    assert set(marker.outputs) == {"images/shard=000001/part-0.parquet", "masks/shard=000001/part-0.parquet",
                                   "labels.zarr/000001"}
    # a shard whose marker is gone (or carries another hash) is invisible to readers
    remove_done(root, 1)
    assert not is_done(root, 1, m.stage1_hash()) and list(CampaignReader(root.url).done()) == [0, 2]


def test_parquet_and_zarr_read_with_plain_libraries(tmp_path):
    root, _, expected = write_demo_campaign(tmp_path / "c")
    # pyarrow alone, as a trainer would
    masks = pq.read_table(tmp_path / "c" / "masks" / "shard=000000" / "part-0.parquet")
    for row in masks.to_pylist():
        mask = mask_utils.decode({"size": [row["height"], row["width"]], "counts": row["rle"]})
        assert mask.sum() == row["area"]
        assert list(mask_utils.toBbox({"size": [row["height"], row["width"]], "counts": row["rle"]})) == row["bbox"]
    # the whole masks dataset (hive partitions) reads with pyarrow.dataset too
    import pyarrow.dataset as ds

    assert ds.dataset(tmp_path / "c" / "masks", format="parquet", partitioning="hive").to_table().num_rows == 8
    # zarr alone
    g = zarr.open_group(str(tmp_path / "c" / "labels.zarr" / "000000"), mode="r")
    assert g["label"].dtype == np.uint16 and g["label"].shape[0] == 2 and g.attrs["image_ids"] == ["im0.png", "im1.png"]
    h, w = g["hw"][1]
    np.testing.assert_array_equal(g["label"][1, :h, :w], expected["im1.png"])
    assert (g["label"][1, h:, :] == IGNORE).all() and (g["label"][1, :, w:] == IGNORE).all()
    assert zarr.open_group(str(tmp_path / "c" / "labels.zarr"), mode="r")["000000"]["hw"].shape == (2, 2)


def test_label_group_rewrite_leaves_no_stale_chunks(tmp_path):
    root = CampaignRoot(tmp_path)
    big = PackedLabels()
    big.add("a", np.zeros((1500, 1100), np.uint16))  # several chunks
    write_label_group(root, 0, big)
    small = PackedLabels()
    small.add("b", np.full((30, 40), 2, np.uint16))
    write_label_group(root, 0, small)
    g = open_label_group(root, 0)
    assert g.image_ids == ["b"] and g.array.shape == (1, 30, 40)
    np.testing.assert_array_equal(g.label(0), 2)
    assert root.find("labels.zarr/000000") == ["hw/c/0/0", "hw/zarr.json", "label/c/0/0/0", "label/zarr.json", "zarr.json"]
    write_label_group(root, 1, PackedLabels())  # a shard whose images all failed
    g1 = open_label_group(root, 1)
    assert g1.image_ids == [] and g1.array.shape == (0, 0, 0)
    with pytest.raises(ValueError, match="uint16"):
        PackedLabels().add("x", np.zeros((3, 3), np.int32))
