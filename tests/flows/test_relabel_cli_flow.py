"""`fmbseg relabel` and the `relabel-campaign` flow: both write the campaign a full `fmbseg label` with the new
vocabulary writes; a campaign labelled without `--relabel-store` is refused with one line naming the flag."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from fmbseg.testing.world import write_world
from flows.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def label_args(world, campaign, vocab, *extra):
    return ["label", "--images", str(world / "images"), "--vocab", vocab, "--campaign", str(campaign), "--preset",
            "oracle", "--device", "cpu", "--shard-size", "2", "--seed", "3", "--no-progress", *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("relabel-cli")
    write_world(base / "w", 3, seed=9, sizes=((120, 160), (96, 128)), formats=("png", "jpg"))
    assert main(label_args(base / "w", base / "c", "red,green,blue,gray", "--relabel-store")) == 0
    assert main(label_args(base / "w", base / "full", "blue,orange,gray,white", "--relabel-store")) == 0
    return base


def same_tables(a, b):
    return all(pq.read_table(a / t).equals(pq.read_table(b / t)) for t in ("images", "masks"))


def test_cli_relabel_equals_full_label_and_reruns_skip(world, tmp_path, capsys):
    args = ["relabel", "--campaign", str(world / "c"), "--vocab", "blue,orange,gray,white", "--out",
            str(tmp_path / "c2"), "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 relabelled, 0 already done" in out and "3 relabelled: 3 ok, 0 failed" in out
    assert same_tables(tmp_path / "c2", world / "full")
    assert main(args) == 0
    assert "0 relabelled, 2 already done" in capsys.readouterr().out


def test_cli_refuses_a_campaign_without_the_store(world, tmp_path, capsys):
    assert main(label_args(world / "w", tmp_path / "old", "red,green")) == 0
    capsys.readouterr()
    code = main(["relabel", "--campaign", str(tmp_path / "old"), "--vocab", "red", "--out", str(tmp_path / "c2"),
                 "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "relabel needs a campaign labelled with fmbseg >= 0.2.0 with `fmbseg label --relabel-store`" in err


def test_relabel_flow_equals_full_label(world, tmp_path, prefect_api):
    from flows.relabel_flow import relabel_campaign

    s = relabel_campaign(campaign=str(world / "c"), vocab="blue,orange,gray,white", out=str(tmp_path / "c2"),
                         device="cpu")
    assert (s["shards_relabelled"], s["ok"], s["failed"], s["failed_shards"]) == (2, 3, 0, [])
    assert same_tables(tmp_path / "c2", world / "full")
