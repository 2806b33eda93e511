"""The CUDA path runs the models under bf16 autocast, which CI (CPU only) never enters. Here every `autocast(device)`
becomes CPU bf16 autocast, and the whole chain — label, train with the feature cache, evaluate every segmenter,
predict — must run without dtype errors and give outputs of the right shapes and types."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import fmbseg.device
import fmbseg.models.clip
import fmbseg.models.dino
import fmbseg.models.sam
import fmbseg.models.sliding
import fmbseg.segmenters
import stages.train
from fmbseg.testing.world import write_world
from stages.evaluate import evaluate
from stages.predict import predict_folder
from stages.train import TrainConfig, train_alignment
from storage.reader import CampaignReader

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cpu_bf16(device):
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_label_train_eval_predict_under_bf16_autocast(tmp_path, monkeypatch, label_world):
    entered = []

    def bf16(device):
        entered.append(device)
        return _cpu_bf16(device)

    for module in (fmbseg.device, fmbseg.models.clip, fmbseg.models.sam, fmbseg.models.dino, fmbseg.models.sliding,
                   fmbseg.segmenters, stages.train):
        monkeypatch.setattr(module, "autocast", bf16)

    write_world(tmp_path / "w", 3, seed=4, sizes=((160, 200), (200, 150)))
    label_world(tmp_path / "w", tmp_path / "c", preset="tiny")
    reader = CampaignReader(str(tmp_path / "c"))
    masks = reader.masks()
    assert masks.num_rows > 0 and masks.schema.field("score").type == "float"
    assert all(np.isfinite(masks.column("score").to_numpy()))
    for _, _, label in reader.iter_labels():
        assert label.dtype == np.uint16

    ckpt = train_alignment(str(tmp_path / "c"), TrainConfig(epochs=2, train_size=112, cache_features=True,
                                                            device="cpu"), progress=False)
    models = ["maskclip", "stage1.1", "stage1.2", "stage1", "fmbseg"]
    res = evaluate("custom", str(tmp_path / "w"), models, str(tmp_path / "rep"), checkpoint=ckpt, device="cpu",
                   progress=False)
    assert set(res) == set(models) and all(0.0 <= res[m]["mIoU"] <= 100.0 for m in models)
    assert set(json.loads((tmp_path / "rep" / "results.json").read_text())["results"]["custom:w"]) == set(models)

    paths = predict_folder(ckpt, str(tmp_path / "w" / "images"), str(tmp_path / "w" / "classes.txt"),
                           str(tmp_path / "pred"), device="cpu")
    assert len(paths) == 3
    with Image.open(paths[0]) as im:
        assert np.array(im).max() < 12
    # every model role really ran under the patched autocast
    assert len(entered) > 10
