"""The `export-campaign` flow and the pseudo-label gallery the pipeline publishes, run in this process against the
session's Prefect server."""

from __future__ import annotations

import json

from prefect import flow

from flows.artifacts import artifact_key
from flows.export_flow import export_campaign_flow, publish_pseudo_label_sample


def test_export_flow_writes_coco_and_publishes_a_summary(prefect_api, reference_campaign, tmp_path):
    from prefect.artifacts import Artifact

    out = tmp_path / "coco"
    summary = export_campaign_flow(campaign=str(reference_campaign), format="coco", out=str(out))
    coco = json.loads((out / "annotations.json").read_text())
    assert summary["images"] == len(coco["images"]) > 0 and summary["masks"] == len(coco["annotations"])
    art = Artifact.get(artifact_key("export-coco", str(out)))
    assert art is not None and str(summary["images"]) in art.data


def test_pseudo_label_gallery_artifact(prefect_api, reference_campaign, tmp_path):
    from prefect.artifacts import Artifact

    @flow(name="gallery-test")
    def gallery() -> dict:
        return publish_pseudo_label_sample(str(reference_campaign), images=2, out=str(tmp_path / "show"))

    res = gallery()
    assert len(res["pictures"]) == 2 and all(p.endswith(".png") for p in res["pictures"])
    art = Artifact.get(res["artifact"])
    assert art.type == "markdown" and art.data.count("data:image/jpeg;base64,") == 2
