"""Fixtures shared across the test packages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Training-heavy modules run torch on one thread: the test machine's 2 cores are shared (Prefect servers and
    workers run beside the tests), and two OpenMP threads spinning against other processes run ~40x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def label_world():
    """`label_world(world, campaign, preset="oracle", **LabelConfig fields)`: a Stage-1 campaign over a world written
    by `fmbseg.testing.world.write_world` (its images and its classes.txt as the vocabulary), on CPU."""
    from stages.label import LabelConfig, run_label

    def label(world: Path, campaign: Path, preset: str = "oracle", **fields) -> Path:
        run_label(LabelConfig(images=str(Path(world) / "images"), vocab=str(Path(world) / "classes.txt"),
                              campaign=str(campaign), preset=preset, device="cpu", **fields), progress=False)
        return Path(campaign)

    return label
