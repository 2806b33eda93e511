"""The CLIP-oracle's confusable-class knobs (`similar`, `noise`, `noise_block`), used to validate `fmbseg stats`;
off by default, where the oracle stays exact (tests/fmbseg/testing/test_oracle.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmbseg.models.base import to_tensor
from fmbseg.testing.oracle import build_oracle_clip
from fmbseg.testing.palette import PALETTE_NAMES, PALETTE_RGB

ORANGE, YELLOW, RED = (PALETTE_NAMES.index(n) for n in ("orange", "yellow", "red"))


def test_similar_pairs_get_the_asked_cosine_and_nothing_else_moves():
    exact = build_oracle_clip()
    clip = build_oracle_clip(similar={("Orange", "yellow"): 0.9}, noise=0.0)
    t = clip.encode_text(list(PALETTE_NAMES))
    gram = (t @ t.T).numpy()
    want = np.eye(12)
    want[ORANGE, YELLOW] = want[YELLOW, ORANGE] = 0.9
    np.testing.assert_allclose(gram, want, atol=1e-5)
    torch.testing.assert_close(clip.colour_vectors[ORANGE], exact.colour_vectors[ORANGE])
    assert exact.model_id == "oracle-clip" and "orange~yellow=0.9" in clip.model_id
    # without noise every pure patch is still nearest to its own colour's text
    img = np.zeros((224, 224), int) + YELLOW
    cls, dense = clip.encode_crops(to_tensor(PALETTE_RGB[img])[None])
    assert int((dense[0] @ t.T).argmax(-1).unique()) == YELLOW and int((cls @ t.T).argmax()) == YELLOW


def test_noise_is_seeded_by_content_and_blocks_share_it():
    clip = build_oracle_clip(noise=1.0, noise_block=7)
    img = np.full((224, 224), RED)
    img[:, 100:] = ORANGE
    x = to_tensor(PALETTE_RGB[img])[None]
    cls1, dense1 = clip.encode_crops(x)
    cls2, dense2 = build_oracle_clip(noise=1.0, noise_block=7).encode_crops(torch.cat([x, x.flip(-1)]))
    torch.testing.assert_close(dense1[0], dense2[0])  # same pixels, same noise, whatever the batch
    torch.testing.assert_close(cls1[0], cls2[0])
    assert not torch.allclose(dense1[0], build_oracle_clip().encode_crops(x)[1][0])
    # one noise vector per 7 x 7 patches: inside a block of one colour the embeddings are equal
    torch.testing.assert_close(dense1[0, 0, 0], dense1[0, 6, 5])
    assert not torch.allclose(dense1[0, 0, 0], dense1[0, 7, 0])


def test_bad_knobs_are_refused():
    with pytest.raises(ValueError, match="palette"):
        build_oracle_clip(similar={("orange", "teal"): 0.9})
    with pytest.raises(ValueError, match="one pair only"):
        build_oracle_clip(similar={("orange", "yellow"): 0.9, ("yellow", "red"): 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_oracle_clip(similar={("orange", "yellow"): 1.5})
    with pytest.raises(ValueError, match="noise"):
        build_oracle_clip(noise=-1)
    with pytest.raises(ValueError, match="noise_block"):
        build_oracle_clip(noise=1, noise_block=0)
