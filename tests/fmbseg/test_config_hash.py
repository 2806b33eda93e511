"""Campaigns and checkpoints written by earlier code keep their config hash: the Stage-1 hash of `campaign.json`
and the train hash of a checkpoint, for every preset's defaults and for overrides given the ways users give them
(ints for floats, lists for tuples). The expected values below were computed by the code before the settings
became pydantic models (commit 8a3307d) and are hard-coded: a change to any stored dict or hash fails here."""

from __future__ import annotations

import hashlib

import pytest

from storage.campaign import CampaignManifest
from storage.fs import canonical_json

VOCABULARY = {"names": ["cat", "dog"], "synonyms": [["cat"], ["dog", "puppy"]]}
MODELS = {"clip": {"id": "open_clip:ViT-B-16/openai", "weights_sha256": "ab" * 32},
          "sam": {"id": "segment_anything:vit_b", "weights_sha256": None}}

# case -> (preset, the user's Stage-1 overrides)
STAGE1_CASES = {
    "paper": ("paper", {}),
    "base": ("base", {}),
    "tiny": ("tiny", {}),
    "oracle": ("oracle", {}),
    "points_per_side=16": ("base", {"points_per_side": 16}),
    "dense_mode=sclip": ("base", {"dense_mode": "sclip"}),
    "two templates": ("base", {"templates": ["a photo of a {}.", "a picture of the {}."]}),
    "upscale=2 (int)": ("base", {"upscale": 2}),
    "thresholds as ints": ("base", {"pred_iou_thresh": 1, "min_area_frac": 0, "stage12_fraction": 1}),
    "tiny + overrides": ("tiny", {"points_per_side": 4, "point_outputs": "single", "stage12_undetected": "drop",
                                  "max_side": 512, "min_crop_votes": 2, "upscale": 1.5}),
}

EXPECTED_STAGE1_HASH = {
    'paper': 'bd263b8e38e75292143baa3161d68118f90af1dfc00a817be2672b5ae90fc25d',
    'base': '8f5c8b4089bfe280c38eaf974eb567be9d1b97450c303411442b00f35ede180b',
    'tiny': '818a008293d1e0c26326b9cea1431180d0ae2cd4a17e8aa627e80b2e23c20480',
    'oracle': 'a5fbb7c6dbe5818e2452f205d789343d69203b81f0e38cc6e0a13dffdbdee440',
    'points_per_side=16': 'ce50c1aefcb23bc4910761c4012de38d4454860498198b4366a734f4f35b9a37',
    'dense_mode=sclip': 'c0e82df1e9a158a85748efc6ae0ce9f2d2a85357303916cac79c77c7e3b48882',
    'two templates': 'b52c0995a9993b63e40f1223914288a0cd5663f9d9bb670521d631c9895c603a',
    'upscale=2 (int)': '8f5c8b4089bfe280c38eaf974eb567be9d1b97450c303411442b00f35ede180b',
    'thresholds as ints': '37116743658d6bdc4453f5e0ff27d59a0edfc4ffa7ebbbf2b31fe6300f77a00e',
    'tiny + overrides': '6b2000f82bd501005fd735c203416805400ecdfaf9f0765ce4cd56d4bfc0fb64',
}

# The stored `stage1` dict of a default `base` campaign, as campaign.json holds it (canonical JSON).
EXPECTED_BASE_STAGE1_JSON = (
    '{"box_nms_thresh":0.7,"clip_batch_size":32,"dense_mode":"maskclip","max_area_frac":0.95,"max_side":2048,"min_area_frac":0.0005,"min_crop_votes":1,"point_outputs":"all4","points_per_batch":64,"points_per_class":5,"points_per_side":32,"pred_iou_thresh":0.88,"stability_score_offset":1.0,"stability_score_thresh":0.95,"stage12_fraction":0.75,"stage12_undetected":"paper","templates":["a photo of a {}."],"upscale":2.0}')

# A campaign.json written before `point_outputs` and `stage12_undetected` existed: the config it is labelled with.
LEGACY_STORED = {"upscale": 2.0, "max_side": 2048, "clip_batch_size": 32, "min_crop_votes": 1, "points_per_class": 5,
                 "points_per_side": 32, "points_per_batch": 64, "pred_iou_thresh": 0.88,
                 "stability_score_thresh": 0.95, "stability_score_offset": 1.0, "box_nms_thresh": 0.7,
                 "min_area_frac": 0.0005, "max_area_frac": 0.95, "stage12_fraction": 0.75,
                 "templates": ["a photo of a {}."], "dense_mode": "maskclip"}
EXPECTED_LEGACY_JSON = (
    '{"box_nms_thresh":0.7,"clip_batch_size":32,"dense_mode":"maskclip","max_area_frac":0.95,"max_side":2048,"min_area_frac":0.0005,"min_crop_votes":1,"point_outputs":"multimask","points_per_batch":64,"points_per_class":5,"points_per_side":32,"pred_iou_thresh":0.88,"stability_score_offset":1.0,"stability_score_thresh":0.95,"stage12_fraction":0.75,"stage12_undetected":"paper","templates":["a photo of a {}."],"upscale":2.0}')

# case -> (the user's training settings, images in the campaign, the cache choice of "auto")
TRAIN_CASES = {
    "defaults, 40 images, cached": ({}, 40, True),
    "defaults, 1000 images, uncached": ({}, 1000, False),
    "demo": ({"epochs": 250, "train_size": 112, "cache_features": True}, 40, False),
    "everything set": ({"epochs": 3, "batch_size": 2, "lr": 0.05, "momentum": 0.8, "weight_decay": 0.0,
                        "temperature": 0.07, "train_size": 224, "seed": 7, "cache_features": False,
                        "procrustes": False, "device": "cpu"}, 12, True),
    "lr as an int": ({"lr": 1, "epochs": 2}, 12, False),
}
EXPECTED_TRAIN_HASH = {
    'defaults, 40 images, cached': '26dd701281b80a88',
    'defaults, 1000 images, uncached': 'df3d738f10abb1db',
    'demo': '0d3bafd0fbd2f8a0',
    'everything set': '7b1c4bd4d6951fa3',
    'lr as an int': 'ecd56805f415768b',
}
# The `train` dict a checkpoint and its model.config.json hold (the resolved config), per case.
EXPECTED_TRAIN_JSON = {
    'defaults, 40 images, cached': '{"batch_size":5,"cache_features":true,"device":"auto","epochs":250,"lr":0.1,"momentum":0.9,"procrustes":true,"seed":0,"temperature":0.1,"train_size":224,"weight_decay":0.0001}',
    'defaults, 1000 images, uncached': '{"batch_size":5,"cache_features":false,"device":"auto","epochs":10,"lr":0.1,"momentum":0.9,"procrustes":true,"seed":0,"temperature":0.1,"train_size":448,"weight_decay":0.0001}',
    'demo': '{"batch_size":5,"cache_features":true,"device":"auto","epochs":250,"lr":0.1,"momentum":0.9,"procrustes":true,"seed":0,"temperature":0.1,"train_size":112,"weight_decay":0.0001}',
    'everything set': '{"batch_size":2,"cache_features":false,"device":"cpu","epochs":3,"lr":0.05,"momentum":0.8,"procrustes":false,"seed":7,"temperature":0.07,"train_size":224,"weight_decay":0.0}',
    'lr as an int': '{"batch_size":5,"cache_features":false,"device":"auto","epochs":2,"lr":1,"momentum":0.9,"procrustes":true,"seed":0,"temperature":0.1,"train_size":224,"weight_decay":0.0001}',
}


EXPECTED_BASE_CAMPAIGN_JSON_SHA256 = '88a7a1b7edd79eee7d09f5ab80d2fcd73be1139e5c95118469bad03b5e79b2d0'


def stage1_dict(preset: str, overrides: dict) -> dict:
    from stages.label import build_stage1_config

    return build_stage1_config(preset, overrides).to_dict()


def manifest(preset: str, stage1: dict) -> CampaignManifest:
    return CampaignManifest(stage1=stage1, vocabulary=VOCABULARY, preset=preset, models=MODELS, seed=3,
                            code_version="0.0.0", inputs={"images": "/data/images", "image_root": None})


def base_stage1_hash() -> str:
    return manifest("base", stage1_dict("base", {})).stage1_hash()


def resolved_train(settings: dict, images: int, cache: bool):
    from stages.train import TrainConfig

    return TrainConfig.from_dict(settings).resolved(images, cache)


def train_dict(cfg) -> dict:
    """What `stages.train` writes as the checkpoint's `config.train`."""
    return cfg.to_dict()


@pytest.mark.parametrize("case", sorted(STAGE1_CASES))
def test_stage1_hash_of_campaigns_written_before(case):
    preset, overrides = STAGE1_CASES[case]
    m = manifest(preset, stage1_dict(preset, overrides))
    assert m.stage1_hash() == EXPECTED_STAGE1_HASH[case]
    # campaign.json round trip: what is read back hashes the same
    assert CampaignManifest.from_json(m.to_json()).stage1_hash() == EXPECTED_STAGE1_HASH[case]


def test_stored_stage1_dicts_are_unchanged():
    assert canonical_json(stage1_dict("base", {})).decode() == EXPECTED_BASE_STAGE1_JSON
    whole = canonical_json(manifest("base", stage1_dict("base", {})).to_json())  # the whole campaign.json
    assert hashlib.sha256(whole).hexdigest() == EXPECTED_BASE_CAMPAIGN_JSON_SHA256
    from fmbseg.stage1 import Stage1Config

    assert canonical_json(Stage1Config.from_stored(LEGACY_STORED).to_dict()).decode() == EXPECTED_LEGACY_JSON


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_hash_of_checkpoints_written_before(case):
    from stages.train import train_hash

    settings, images, cache = TRAIN_CASES[case]
    # Checkpoints written before `crop_min` trained on the whole view every step: `crop_min=1` names them.
    cfg = resolved_train({**settings, "crop_min": 1}, images, cache)
    assert train_hash(cfg, base_stage1_hash()) == EXPECTED_TRAIN_HASH[case]
    stored = train_dict(cfg)
    assert stored.pop("crop_min") == 1.0
    assert canonical_json(stored).decode() == EXPECTED_TRAIN_JSON[case]
    # Today's default (random windows) is another training, so another checkpoint.
    windows = resolved_train(settings, images, cache)
    assert windows.crop_min == 0.4
    assert train_hash(windows, base_stage1_hash()) != EXPECTED_TRAIN_HASH[case]
