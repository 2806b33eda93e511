"""The `train-alignment` flow: Stage 2 (DESIGN §1) on a finished campaign, one task around `stages.train`.

The stage names the checkpoint after the hash of its training config (`<campaign>/train/<hash>/model.pt`),
reuses a finished checkpoint with the same hash and resumes an interrupted one, so rerunning this flow is cheap
and changing a training setting trains a new model without touching Stage 1's outputs.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.gpu import GPU_TAG
from flows.artifacts import artifact_key, markdown_table, publish_markdown
from flows.label_flow import retry_unless_permanent
from stages.train import train_alignment
from stages.train_config import TrainConfig, TrainOverrides


def train_config(train: TrainOverrides | dict | None = None, device: str | None = None) -> dict:
    """`TrainConfig` overrides as a full, validated dict; `device` fills in the device unless `train` sets it."""
    train = TrainOverrides.dict_of(train)
    if device is not None:
        train.setdefault("device", device)
    return TrainConfig.from_dict(train).to_dict()


@task(name="train-alignment", tags=[GPU_TAG], cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_permanent)
def train_task(campaign: str, config: dict, out: str | None = None) -> str:
    """-> the checkpoint path (an interrupted attempt resumes from its last finished epoch on retry)."""
    return str(train_alignment(campaign, TrainConfig.from_dict(config), out=out, progress=False))


@flow(name="train-alignment")
def train_alignment_flow(campaign: str, train: TrainOverrides | None = None, out: str | None = None,
                         device: str = "auto") -> str:
    """Train the alignment module (Stage 2) on the campaign's pseudo-labels; returns the checkpoint path.

    A finished checkpoint with the same settings is reused, an interrupted one resumes. The resolved settings and
    the plan are in the checkpoint and `model.config.json`.

    Args:
        campaign: Campaign directory (local path or fsspec URL) labelled by label-campaign.
        train: Training settings to change (every field has its description and bounds); empty fields keep their
            default. epochs, train_size and cache_features default to auto (resolved from the campaign's size
            and the free disk space).
        out: Checkpoint path (default: <campaign>/train/<train hash>/model.pt).
        device: auto, cpu or cuda[:N]; used unless `train` sets its own device.
    """
    config = train_config(train, device)
    checkpoint = train_task(campaign, config, out)
    get_run_logger().info("checkpoint: %s", checkpoint)
    rows = [{"setting": k, "value": v} for k, v in config.items()]
    publish_markdown(
        f"**Checkpoint** `{checkpoint}`\n\n**Campaign** `{campaign}`\n\n{markdown_table(rows)}\n",
        key=artifact_key("train-summary", campaign),
        description="Alignment training: checkpoint and settings",
    )
    return checkpoint
