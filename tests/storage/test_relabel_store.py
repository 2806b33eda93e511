"""`relabel.zarr/NNNNNN/` (storage/relabel_store.py) and the Stage-1 records it holds (fmbseg/kept.py): every array
comes back bit-equal, in its dtype and shape; bfloat16-valued float32 arrays are stored in 2 bytes, others as is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storage.relabel_store import build_relabel_group, has_relabel_store, read_relabel_group


def test_round_trip_is_bit_exact_with_absent_arrays_and_varying_shapes():
    rng = np.random.default_rng(0)
    bf16 = (rng.standard_normal((2, 3, 4)).astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    records = [
        {"dense": rng.standard_normal((3, 5, 8)).astype(np.float32), "emb": bf16, "boxes": np.arange(8).reshape(2, 4),
         "special": np.array([np.nan, np.inf, -0.0, 1e-40], np.float32)},
        {"dense": rng.standard_normal((4, 2, 8)).astype(np.float32), "boxes": np.zeros((0, 4), np.int64),
         "special": np.array([1.0, 2.0, 3.0, 4.0], np.float32)},
        {"dense": rng.standard_normal((1, 1, 8)).astype(np.float32), "emb": bf16[:1] * 2,
         "boxes": np.ones((1, 4), np.int64), "special": np.zeros(4, np.float32)},
    ]
    files = build_relabel_group(["a", "b", "c"], records, shard_id=7)
    back = read_relabel_group(files)
    assert list(back) == ["a", "b", "c"]
    for image_id, rec in zip("abc", records):
        assert set(back[image_id]) == set(rec)
        for name, arr in rec.items():
            got = back[image_id][name]
            assert got.dtype == arr.dtype and got.shape == arr.shape
            assert got.tobytes() == arr.tobytes()  # bit-equal, NaN and -0.0 included
    import zarr

    proto = zarr.core.buffer.default_buffer_prototype()
    g = zarr.open_group(store=zarr.storage.MemoryStore({k: proto.buffer.from_bytes(v) for k, v in files.items()}),
                        mode="r")
    assert g.attrs["arrays"]["emb"] == {"dtype": "float32", "encoding": "bfloat16"}
    assert g["emb/values"].dtype == np.uint16  # 2 bytes per bf16 value on disk
    assert g.attrs["arrays"]["dense"]["encoding"] == "raw"
    assert g["emb/shape"][1].tolist() == [-1, -1, -1]  # image b has no embedding
    assert has_relabel_store({"relabel.zarr/000007/zarr.json": "x"}, 7)
    assert not has_relabel_store({"labels.zarr/000007/zarr.json": "x"}, 7)


def test_inconsistent_dtypes_are_refused():
    with pytest.raises(ValueError, match="'x' has dtypes"):
        build_relabel_group(["a", "b"], [{"x": np.zeros(2, np.float32)}, {"x": np.zeros(2, np.float64)}], 0)


@pytest.mark.parametrize("preset", ["tiny", "oracle"])
def test_kept_stage1_results_round_trip_through_the_store(preset):
    from fmbseg.kept import kept_from_arrays, kept_to_arrays
    from fmbseg.presets import make_clip, make_sam
    from fmbseg.stage1 import Stage1Config, run_stage1
    from fmbseg.testing.world import make_world_image

    clip, sam = make_clip(preset, "cpu"), make_sam(preset, "cpu")
    image = make_world_image(np.random.default_rng(3), 96, 128)[0]
    text = clip.encode_text(["red", "green", "blue"])
    cfg = Stage1Config(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, min_area_frac=0.0)
    r = run_stage1(image, clip, sam, text, cfg, seed=0, image_id="x", keep=True)
    assert r.kept is not None and r.kept.embedding is not None and r.kept.autos
    arrays = kept_to_arrays(r.kept, sam)
    back = kept_from_arrays(read_relabel_group(build_relabel_group(["x"], [arrays], 0))["x"], sam, "cpu")
    sf, sf2 = r.kept.features, back.features
    assert torch.equal(sf.crop_cls, sf2.crop_cls) and torch.equal(sf.dense, sf2.dense)
    assert np.array_equal(sf.crop_boxes, sf2.crop_boxes)
    assert (sf.scale_xy, sf.patch_size, sf.image_hw) == (sf2.scale_xy, sf2.patch_size, sf2.image_hw)
    assert len(back.autos) == len(r.kept.autos)
    for (m, s), (m2, s2) in zip(r.kept.autos, back.autos):
        assert np.array_equal(m, m2) and s == s2
    a1, a2 = sam.embedding_arrays(r.kept.embedding), sam.embedding_arrays(back.embedding)
    assert all(np.array_equal(a1[k], a2[k]) for k in a1)
    assert back.embedding.original_hw == r.kept.embedding.original_hw
    assert back.embedding.input_hw == r.kept.embedding.input_hw
