"""`CampaignDataset`: random access to (image, label) equal to the campaign, committed shards only, the same items
through a DataLoader with worker processes, and `iter_masks` equal to the stored RLEs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from storage.dataset import CampaignDataset
from storage.reader import CampaignReader
from storage.tables import decode_rle

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, label_world):
    from fmbseg.testing.world import write_world

    root = tmp_path_factory.mktemp("dataset")
    write_world(root / "world", 5, seed=7, sizes=((64, 80), (72, 64)))
    (root / "world" / "images" / "world_0002_broken.png").write_bytes(b"\x89PNG broken")
    return label_world(root / "world", root / "campaign", shard_size=2)


def test_items_equal_the_campaign(campaign):
    from fmbseg.images import load_image

    ds = CampaignDataset(campaign)
    expected = list(CampaignReader(str(campaign)).iter_labels())
    assert len(ds) == len(expected) == 5 and ds.image_ids == [e[0] for e in expected]  # the failed one left out
    for i in (3, 0, 4, -1):  # random access, in any order
        image_id, path, label = expected[i]
        image, got = ds[i]
        assert image.dtype == np.uint8 and got.dtype == np.int64
        np.testing.assert_array_equal(image, load_image(path))
        np.testing.assert_array_equal(got, np.where(label == 65535, 255, label))
    assert CampaignDataset(campaign, ignore_index=-1)[0][1].min() >= -1
    with pytest.raises(IndexError):
        ds[len(ds)]


def to_chw(image, label):
    return torch.from_numpy(image).permute(2, 0, 1), label


def test_dataloader_with_workers_gives_the_same_items(campaign):
    ds = CampaignDataset(campaign, transform=to_chw)
    ds[0]  # open handles in the parent first: workers must not reuse them
    # Spawned workers get the dataset by pickling (handles dropped, reopened per worker). Not forked: by the time
    # this runs, the test process has run Prefect and Ray clients whose threads make a fork of it unsafe.
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    got = list(loader)
    assert len(got) == len(ds)
    for i, (image, label) in enumerate(got):
        ref_image, ref_label = ds[i]
        assert torch.equal(image, ref_image) and torch.equal(label, torch.from_numpy(ref_label))


def test_uncommitted_shards_are_invisible(campaign, tmp_path):
    c = tmp_path / "c"
    shutil.copytree(campaign, c, symlinks=True)
    (c / "done" / "000000.json").unlink()
    ds = CampaignDataset(c)
    hidden = {e.image_id for e in CampaignReader(str(c)).shard_images(0)}
    assert len(ds) == 3 and not set(ds.image_ids) & hidden


def test_iter_masks_equals_the_stored_rles(campaign):
    ds = CampaignDataset(campaign)
    masks = CampaignReader(str(campaign)).masks().to_pydict()
    items = list(ds.iter_masks())
    assert [it["image_id"] for it in items] == ds.image_ids
    k = 0
    for it in items:
        for j in range(len(it["class_id"])):
            assert masks["image_id"][k] == it["image_id"] and masks["mask_id"][k] == it["mask_id"][j]
            np.testing.assert_array_equal(it["masks"][j], decode_rle(masks["rle"][k], masks["height"][k],
                                                                     masks["width"][k]))
            assert it["class_id"][j] == masks["class_id"][k] and it["selected"][j] == masks["selected"][k]
            k += 1
    assert k == len(masks["rle"])
    selected = sum(len(it["class_id"]) for it in ds.iter_masks(selected_only=True))
    assert selected == sum(masks["selected"])


def test_ignore_index_inside_the_class_range_is_refused(campaign):
    with pytest.raises(ValueError, match="ignore_index 3"):
        CampaignDataset(campaign, ignore_index=3)
