"""`fmbseg train`, `fmbseg eval`, `fmbseg predict` through the real argument parser: flags of DESIGN §7, outputs,
and exit status 2 with a one-line reason for bad arguments or missing inputs."""

import json

import pytest

from flows.cli import build_parser, main
from fmbseg.testing.world import write_world


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world_and_campaign(tmp_path_factory, label_world):
    base = tmp_path_factory.mktemp("cli2")
    write_world(base / "w", 4, seed=6, sizes=((160, 210), (210, 160)))
    label_world(base / "w", base / "camp")
    return base


def test_subcommands_registered():
    text = build_parser().format_help()
    for name in ("train", "eval", "predict"):
        assert name in text


def test_train_eval_predict(world_and_campaign, capsys):
    base = world_and_campaign
    ckpt = base / "model.pt"
    assert main(["train", "--campaign", str(base / "camp"), "--epochs", "1", "--out", str(ckpt),
                 "--train-size", "112", "--batch-size", "2", "--seed", "3", "--device", "cpu", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(ckpt)
    assert ckpt.is_file() and (base / "model.config.json").is_file()
    train = json.loads((base / "model.config.json").read_text())["train"]
    assert (train["train_size"], train["batch_size"], train["seed"], train["epochs"]) == (112, 2, 3, 1)
    assert train["procrustes"] is True and train["cache_features"] is True     # the defaults, resolved
    assert main(["eval", "--dataset", "custom", "--data-root", str(base / "w"), "--models", "maskclip,fmbseg",
                 "--checkpoint", str(ckpt), "--out", str(base / "rep"), "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "custom:w       maskclip" in out and "custom:w       fmbseg" in out and "results.md" in out
    res = json.loads((base / "rep" / "results.json").read_text())["results"]["custom:w"]
    assert res["maskclip"]["config"]["preset"] == "oracle"       # --preset defaults to the checkpoint's
    assert main(["predict", "--checkpoint", str(ckpt), "--images", str(base / "w" / "images"), "--vocab",
                 str(base / "w" / "classes.txt"), "--out", str(base / "pred"), "--device", "cpu",
                 "--no-progress"]) == 0
    assert len(list((base / "pred").glob("*_overlay.jpg"))) == 4 and len(list((base / "pred").glob("world_*[0-9].png"))) == 4


@pytest.mark.parametrize("argv, reason", [
    (["train", "--campaign", "{tmp}/none"], "no campaign at"),
    (["train", "--campaign", "{tmp}/none", "--epochs", "0"], "--epochs must be an integer >= 1 or auto, got 0"),
    (["train", "--campaign", "{tmp}/none", "--epochs", "many"], "--epochs must be an integer >= 1 or auto, got many"),
    (["train", "--campaign", "{tmp}/none", "--train-size", "big"], "--train-size must be an integer >= 1 or auto"),
    (["eval", "--dataset", "custom", "--data-root", "{tmp}/none", "--models", "maskclip", "--out", "{tmp}/o"],
     "is not a folder"),
    (["eval", "--dataset", "voc", "--data-root", "{tmp}", "--models", "maskclip", "--out", "{tmp}/o"],
     "unknown dataset"),
    (["eval", "--dataset", "custom", "--data-root", "{tmp}", "--models", "fmbseg", "--out", "{tmp}/o"],
     "needs --checkpoint"),
    (["eval", "--dataset", "custom", "--data-root", "{tmp}", "--models", "fmbseg", "--checkpoint", "{tmp}/x.pt",
      "--out", "{tmp}/o"], "checkpoint not found"),
    (["predict", "--checkpoint", "{tmp}/x.pt", "--images", "{tmp}", "--vocab", "red", "--out", "{tmp}/o"],
     "checkpoint not found"),
    (["predict", "--checkpoint", "{tmp}/x.pt", "--images", "{tmp}/nope", "--vocab", "red", "--out", "{tmp}/o"],
     "does not exist"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, reason):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert reason in err and len(err.splitlines()) == 1, err
