"""Typed settings as a user meets them: the Prefect parameter forms (every parameter described, `stage1`/`train`
as objects with per-field descriptions and bounds, presets/datasets/runners/dense modes as choices), dicts given
to a flow as `--params` JSON gives them, and the CLI flags generated from the same models."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
import yaml

from flows.cli import build_parser, main
from flows.evaluate_flow import evaluate_flow, evaluate_on_ray
from flows.export_flow import export_campaign_flow
from flows.label_flow import label_campaign, label_shards_ray
from flows.pipeline import fmbseg_pipeline
from flows.relabel_flow import relabel_campaign
from flows.stats_flow import campaign_stats_flow
from flows.train_flow import train_alignment_flow, train_config

REPO = Path(__file__).resolve().parents[2]
FLOWS = {f.name: f for f in (label_campaign, train_alignment_flow, evaluate_flow, fmbseg_pipeline,
                             export_campaign_flow, campaign_stats_flow, label_shards_ray, evaluate_on_ray,
                             relabel_campaign)}
ENTRYPOINTS = {"label-campaign": "flows/label_flow.py:label_campaign",
               "fmbseg-pipeline": "flows/pipeline.py:fmbseg_pipeline",
               "train-alignment": "flows/train_flow.py:train_alignment_flow",
               "evaluate": "flows/evaluate_flow.py:evaluate_flow"}


def _schema(flow) -> dict:
    from prefect.utilities.callables import parameter_schema

    return parameter_schema(flow.fn).model_dump()


def _model_schema(schema: dict, param: str) -> dict:
    """The object schema a parameter refers to (`anyOf: [{$ref}, null]`)."""
    ref = next(a["$ref"] for a in schema["properties"][param]["anyOf"] if "$ref" in a)
    return schema["definitions"][ref.rsplit("/", 1)[1]]


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_every_flow_parameter_is_described(name):
    schema = _schema(FLOWS[name])
    undescribed = [p for p, s in schema["properties"].items() if not (s.get("description") or "").strip()]
    assert not undescribed, f"{name}: parameters without a description: {undescribed}"


@pytest.mark.parametrize("name", sorted(ENTRYPOINTS))
def test_the_schema_read_from_source_is_as_typed(name):
    """`prefect deploy` may build the form from the file's source instead of the imported flow: same result."""
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    from_source = parameter_schema_from_entrypoint(str(REPO / ENTRYPOINTS[name])).model_dump()
    assert from_source["properties"] == _schema(FLOWS[name])["properties"]
    assert from_source.get("definitions") == _schema(FLOWS[name]).get("definitions")


def test_settings_render_as_objects_with_descriptions_and_bounds():
    from fmbseg.stage1_config import Stage1Config
    from stages.train_config import TrainConfig

    for flow, param, settings in ((label_campaign, "stage1", Stage1Config), (fmbseg_pipeline, "stage1", Stage1Config),
                                  (evaluate_flow, "stage1", Stage1Config), (train_alignment_flow, "train", TrainConfig),
                                  (fmbseg_pipeline, "train", TrainConfig)):
        obj = _model_schema(_schema(flow), param)
        assert obj["type"] == "object"
        shown = set(obj["properties"])
        assert shown == set(settings.model_fields), (flow.name, param)
        for field, s in obj["properties"].items():
            assert settings.model_fields[field].description in s["description"], (flow.name, field)
    stage1 = _model_schema(_schema(label_campaign), "stage1")["properties"]
    branch = lambda s: next(a for a in s["anyOf"] if a.get("type") != "null")  # noqa: E731
    assert branch(stage1["points_per_side"]) == {"type": "integer", "minimum": 1}
    assert branch(stage1["pred_iou_thresh"]) == {"type": "number", "minimum": 0, "maximum": 1}
    assert branch(stage1["upscale"]) == {"type": "number", "exclusiveMinimum": 0}
    assert branch(stage1["dense_mode"])["enum"] == ["maskclip", "clearclip", "sclip"]
    assert branch(stage1["point_outputs"])["enum"] == ["all4", "multimask", "single"]
    train = _model_schema(_schema(train_alignment_flow), "train")["properties"]
    assert {"type": "integer", "minimum": 1} in train["epochs"]["anyOf"]
    assert {"const": "auto", "type": "string"} in train["epochs"]["anyOf"]
    assert branch(train["momentum"]) == {"type": "number", "minimum": 0, "exclusiveMaximum": 1}


def test_choices_come_from_the_registries():
    from fmbseg.datasets import DATASET_NAMES, DatasetName
    from fmbseg.models.clip import DENSE_MODES, DenseMode
    from fmbseg.presets import PRESETS, PresetName
    from flows.ray_runner import RUNNERS, Runner
    from storage.export import EXPORT_FORMATS, ExportFormat

    assert typing.get_args(PresetName) == tuple(PRESETS)
    assert typing.get_args(DatasetName) == DATASET_NAMES
    assert typing.get_args(DenseMode) == DENSE_MODES
    assert typing.get_args(Runner) == RUNNERS
    assert typing.get_args(ExportFormat) == EXPORT_FORMATS
    label, pipeline, evaluate = (_schema(f)["properties"] for f in (label_campaign, fmbseg_pipeline, evaluate_flow))
    assert label["preset"]["enum"] == pipeline["preset"]["enum"] == list(PRESETS)
    assert label["runner"]["enum"] == pipeline["runner"]["enum"] == evaluate["runner"]["enum"] == list(RUNNERS)
    assert {"enum": list(DATASET_NAMES), "type": "string"} in pipeline["eval_dataset"]["anyOf"]
    assert _schema(export_campaign_flow)["properties"]["format"]["enum"] == list(EXPORT_FORMATS)


def test_prefect_yaml_parameters_validate():
    """Every deployment's parameters in prefect.yaml pass the flow's own parameter validation."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_entrypoint = {"flows/label_flow.py:label_campaign": label_campaign,
                     "flows/train_flow.py:train_alignment_flow": train_alignment_flow,
                     "flows/evaluate_flow.py:evaluate_flow": evaluate_flow,
                     "flows/pipeline.py:fmbseg_pipeline": fmbseg_pipeline,
                     "flows/export_flow.py:export_campaign_flow": export_campaign_flow,
                     "flows/relabel_flow.py:relabel_campaign": relabel_campaign}
    required = {"images": "i", "vocab": "v", "campaign": "c", "dataset": "custom", "data_root": "d", "out": "o"}
    checked = 0
    for d in spec["deployments"]:
        flow = by_entrypoint[d["entrypoint"]]
        params = d.get("parameters") or {}
        needs = {k: v for k, v in required.items() if k in _schema(flow).get("required", [])}
        flow.validate_parameters({**needs, **params})
        checked += bool(params)
    assert checked >= 2  # the ray and demo deployments set parameters


def test_flow_parameters_accept_dicts_and_refuse_bad_values():
    from prefect.exceptions import ParameterTypeError

    from fmbseg.stage1_config import Stage1Overrides

    ok = label_campaign.validate_parameters({"images": "i", "vocab": "v", "campaign": "c",
                                             "stage1": {"points_per_side": 16, "templates": ["a {}", "b {}"]}})
    assert isinstance(ok["stage1"], Stage1Overrides)
    assert ok["stage1"].overrides() == {"points_per_side": 16, "templates": ["a {}", "b {}"]}
    for bad in ({"points_per_side": 0}, {"pred_iou_thresh": 2}, {"dense_mode": "gem"}, {"upscal": 2},
                {"templates": ["no placeholder"]}):
        with pytest.raises(ParameterTypeError, match=next(iter(bad))):
            label_campaign.validate_parameters({"images": "i", "vocab": "v", "campaign": "c", "stage1": bad})
    with pytest.raises(ParameterTypeError, match="preset"):
        label_campaign.validate_parameters({"images": "i", "vocab": "v", "campaign": "c", "preset": "huge"})
    with pytest.raises(ParameterTypeError, match="epochs"):
        train_alignment_flow.validate_parameters({"campaign": "c", "train": {"epochs": 0}})
    # the demo's training settings, as the deployment passes them
    assert train_config({"epochs": 250, "train_size": 112, "cache_features": True}, "cpu") == {
        "epochs": 250, "batch_size": 5, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "temperature": 0.1,
        "train_size": 112, "seed": 0, "cache_features": True, "procrustes": True, "crop_min": 0.4,
        "device": "cpu"}


def test_label_flow_takes_a_stage1_dict_and_fails_bad_settings_before_any_work(kit, prefect_api, tmp_path):
    world = kit.write_small_world(tmp_path / "world", 2, seed=4)
    campaign = tmp_path / "campaign"
    params = kit.label_params(world, campaign, shard_size=2)
    # Each field valid alone, the combination not: refused before planning, nothing written.
    with pytest.raises(ValueError, match="min_area_frac 0.9 exceeds max_area_frac 0.1"):
        label_campaign(**params, stage1={"min_area_frac": 0.9, "max_area_frac": 0.1})
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError, match="points_per_side"):
        label_campaign(**params, stage1={"points_per_side": 0})
    assert not campaign.exists()
    s = label_campaign(**params, stage1={"points_per_side": 16, "stage12_fraction": 1})
    assert s["images_ok"] == 2
    stored = json.loads((campaign / "campaign.json").read_text())["stage1"]
    assert (stored["points_per_side"], stored["stage12_fraction"]) == (16, 1.0)


def _label_ns(*flags: str):
    return build_parser().parse_args(["label", "--images", "i", "--vocab", "v", "--campaign", "c", *flags])


def test_label_flags_override_only_what_is_given():
    from flows.commands_label import stage1_from_args
    from stages.label import build_stage1_config

    args = _label_ns("--preset", "tiny", "--points-per-side", "4", "--templates", "a {}", "the {}",
                     "--dense-mode", "sclip", "--upscale", "3")
    given = stage1_from_args(args)
    assert given == {"points_per_side": 4, "templates": ["a {}", "the {}"], "dense_mode": "sclip", "upscale": 3.0}
    cfg = build_stage1_config("tiny", given)
    # the tiny preset's own values stay where no flag was given; the rest are the defaults
    assert (cfg.pred_iou_thresh, cfg.stability_score_thresh, cfg.min_area_frac) == (0.0, 0.0, 0.0)
    assert (cfg.points_per_side, cfg.upscale, cfg.max_side) == (4, 3.0, 2048)
    assert stage1_from_args(_label_ns()) == {}


@pytest.mark.parametrize("flags, message", [
    (("--points-per-side", "0"), "--points-per-side must be an integer >= 1, got 0"),
    (("--pred-iou-thresh", "1.5"), "--pred-iou-thresh must be a number in [0, 1], got 1.5"),
    (("--upscale", "big"), "--upscale must be a number > 0, got big"),
    (("--templates", "a photo"), "--templates: template 'a photo' must be a string with exactly one '{}'"),
    (("--min-area-frac", "0.9", "--max-area-frac", "0.1"),
     "invalid Stage-1 config: min_area_frac 0.9 exceeds max_area_frac 0.1"),
])
def test_out_of_bounds_label_flags_exit_2_naming_them(tmp_path, capsys, flags, message):
    (tmp_path / "images").mkdir()
    assert main(["label", "--images", str(tmp_path / "images"), "--vocab", "cat", "--campaign", str(tmp_path / "c"),
                 "--preset", "oracle", "--device", "cpu", "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fmbseg label: error: {message}", err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("flags, message", [
    (("--lr", "0"), "--lr must be a number > 0, got 0"),
    (("--momentum", "1"), "--momentum must be a number in [0, 1), got 1"),
    (("--batch-size", "two"), "--batch-size must be an integer >= 1, got two"),
    (("--temperature", "-1"), "--temperature must be a number > 0, got -1"),
])
def test_out_of_bounds_train_flags_exit_2_naming_them(tmp_path, capsys, flags, message):
    assert main(["train", "--campaign", str(tmp_path / "c"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fmbseg train: error: {message}", err


def test_train_flags_keep_their_names_and_behaviour():
    from flows.commands_stage2 import TRAIN_FLAGS_BY_HAND
    from flows.settings_flags import settings_from_args
    from stages.train_config import TrainOverrides

    names = [n for n in TrainOverrides.model_fields if n not in TRAIN_FLAGS_BY_HAND]
    args = build_parser().parse_args(["train", "--campaign", "c"])
    assert settings_from_args(args, TrainOverrides, names) == {}
    assert (args.cache, args.no_procrustes, args.device) == ("auto", False, "auto")
    args = build_parser().parse_args(["train", "--campaign", "c", "--epochs", "auto", "--train-size", "224",
                                      "--lr", "0.05", "--no-cache", "--no-procrustes", "--seed", "3"])
    assert settings_from_args(args, TrainOverrides, names) == {"epochs": "auto", "train_size": 224, "lr": 0.05,
                                                                "seed": 3}
    assert args.cache is False and args.no_procrustes
