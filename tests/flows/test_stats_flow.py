"""The `campaign-stats` flow: writes the report of stages/stats.py and publishes stats.md as an artifact."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from flows.artifacts import artifact_key
from flows.stats_flow import campaign_stats_flow


def write_hand_campaign(url):
    """The hand-built campaign of tests/stages/test_stats.py (loaded by path: tests are not a package)."""
    path = Path(__file__).resolve().parents[1] / "stages" / "test_stats.py"
    spec = importlib.util.spec_from_file_location("stats_hand_campaign", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_hand_campaign(url)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_stats_flow_writes_report_and_publishes_markdown(prefect_api, tmp_path):
    from prefect.artifacts import Artifact

    root = write_hand_campaign(tmp_path / "camp")
    out = tmp_path / "report"
    summary = campaign_stats_flow(campaign=root.url, out=str(out))
    json.dumps(summary)  # a flow passes small JSON-able values
    assert summary["never_detected"] == ["c"] and summary["coverage"] == pytest.approx(20 / 28)
    assert (out / "stats.md").is_file() and (out / "agreement.png").is_file()
    art = Artifact.get(artifact_key("label-quality", root.url))
    assert art is not None and art.data == (out / "stats.md").read_text()
