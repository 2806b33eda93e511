"""Errors reach the user as one line naming the file and what to do, never a traceback; exit 2 only for usage
errors, 1 for failures while running (issue 13 items 12 and 13). Faults are injected into the real code paths:
a real EFBIG from a file-size limit, a real ENOSPC from /dev/full, a corrupted Zarr chunk, a truncated checkpoint."""

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from flows.cli import describe_error, main
from fmbseg.testing.world import write_world

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("errs")
    write_world(base / "w", 2, seed=5, sizes=((64, 80),))
    assert main(label_args(base, base / "camp")) == 0
    return base


def label_args(base, campaign, *extra):
    return ["label", "--images", str(base / "w" / "images"), "--vocab", str(base / "w" / "classes.txt"),
            "--campaign", str(campaign), "--preset", "oracle", "--device", "cpu", "--no-progress", *extra]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_enospc_while_writing_the_campaign(world, tmp_path, monkeypatch, capsys):
    real = tempfile.mkstemp

    def full_disk(*a, **kw):  # the campaign's temp file, but every write to it hits a full device
        fd, path = real(*a, **kw)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), path

    monkeypatch.setattr(tempfile, "mkstemp", full_disk)
    assert main(label_args(world, tmp_path / "c")) == 1
    err = one_line(capsys)
    assert "no space left on device writing " + str(tmp_path / "c") in err, err
    assert "free space or use another --campaign" in err


def test_efbig_from_a_file_size_limit(world, tmp_path):
    """A real EFBIG: the worker runs under `ulimit -f` (SIGXFSZ ignored, so write() fails with EFBIG)."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600)); from flows.cli import main; "
            f"sys.exit(main({label_args(world, tmp_path / 'c')!r}))")
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    err = res.stderr.strip()
    assert res.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "file too large" in err and str(tmp_path / "c") in err and "ulimit -f" in err, err


def test_campaign_that_is_a_file(world, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file, not a campaign folder")
    assert main(label_args(world, tmp_path / "notes.txt")) == 1
    err = one_line(capsys)
    assert str(tmp_path / "notes.txt") in err and "is a file, not a directory" in err and "--campaign" in err
    assert main(label_args(world, tmp_path / "notes.txt" / "sub")) == 1
    assert "not a directory" in one_line(capsys)


def test_corrupt_zarr_chunk_points_at_verify(world, tmp_path, capsys):
    camp = tmp_path / "camp"
    shutil.copytree(world / "camp", camp)
    chunk = next(p for p in sorted((camp / "labels.zarr").rglob("*")) if p.is_file() and "/label/c/" in str(p))
    chunk.write_bytes(chunk.read_bytes()[:10])                        # a torn chunk: zstd cannot decode it
    assert main(["train", "--campaign", str(camp), "--epochs", "1", "--device", "cpu", "--no-progress"]) == 1
    err = one_line(capsys)
    # Committed files are checked against their done marker before Zarr decodes them: the message names the torn
    # chunk and the repair.
    assert str(chunk.relative_to(camp)) in err and "damaged" in err, err
    assert f"fmbseg verify --campaign {camp}" in err


@pytest.mark.parametrize("cut", [0, 100, 0.5, -10])
def test_truncated_checkpoint(tmp_path, capsys, cut):
    import torch

    from fmbseg.checkpoint import save_checkpoint

    good = tmp_path / "good.pt"
    save_checkpoint(str(good), {"model": {"w": torch.zeros(300)}, "config": {}, "vocabulary": {}, "encoders": {},
                                "temperature": 0.1, "version": "0", "epoch": 1})
    data = good.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    (tmp_path / "model.pt").write_bytes(data[:n])
    (tmp_path / "imgs").mkdir()
    assert main(["predict", "--checkpoint", str(tmp_path / "model.pt"), "--images", str(tmp_path / "imgs"),
                 "--vocab", "red,green", "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"]) == 1
    err = one_line(capsys)
    assert str(tmp_path / "model.pt") in err and ("truncated or corrupt" in err or "empty" in err), err
    assert "Errno 22" not in err and "fmbseg train" in err


@pytest.mark.parametrize("flag,value,needle", [
    ("--vocab", "myvocab.yaml", "vocabulary file not found: myvocab.yaml; did you mean one of the built-in"),
    ("--vocab", "nonexistent_vocab", "unknown vocabulary 'nonexistent_vocab'"),
    ("--vocab", "vocc21", "did you mean 'voc21'"),
    ("--vocab", "Red,red", "duplicate class names"),
    ("--preset", "orcale", "unknown preset 'orcale'; did you mean 'oracle'"),
])
def test_vocab_and_preset_mistakes_are_usage_errors_with_a_hint(world, tmp_path, capsys, monkeypatch, flag, value,
                                                                 needle):
    monkeypatch.chdir(tmp_path)
    args = label_args(world, tmp_path / "c")
    args[args.index(flag) + 1] = value
    assert main(args) == 2
    assert needle in one_line(capsys)
    assert not (tmp_path / "c" / "shards").exists()


def test_dataset_mistake_is_a_usage_error_with_a_hint(tmp_path, capsys):
    assert main(["eval", "--dataset", "ade20k", "--data-root", str(tmp_path), "--models", "maskclip", "--out",
                 str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "unknown dataset 'ade20k'; did you mean 'ade150'" in one_line(capsys)


def test_describe_error_by_errno_and_kind():
    ns = type("A", (), {"command": "label", "campaign": "/data/camp"})()
    cases = {
        OSError(errno.EROFS, "Read-only file system", "/data/camp/x.json"): "read-only file system: cannot write "
                                                                             "/data/camp/x.json: use a writable --campaign",
        OSError(errno.EACCES, "Permission denied", "/data/camp/x"): "permission denied: /data/camp/x",
        OSError(errno.EDQUOT, "Disk quota exceeded", "/data/camp/y"): "disk quota exceeded writing /data/camp/y",
        FileNotFoundError(errno.ENOENT, "No such file", "/data/camp/.tmp-1"): "/data/camp/.tmp-1 vanished",
    }
    for exc, msg in cases.items():
        code, text = describe_error(exc, ns)
        assert code == 1 and text.startswith(msg), text
    assert describe_error(FileNotFoundError("checkpoint not found: x.pt"), ns) == (2, "checkpoint not found: x.pt")
    assert describe_error(ValueError("bad"), ns) == (2, "bad")
    code, text = describe_error(KeyError("hw"), ns)
    assert code == 1 and text.startswith("KeyError: 'hw'") and "FMBSEG_DEBUG=1" in text

    def write_somewhere(target):  # f.write() raising ENOSPC carries no file name: the frame's target names it
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        write_somewhere("/data/camp/masks/part-0.parquet")
    except OSError as e:
        assert describe_error(e, ns) == (1, "no space left on device writing /data/camp/masks/part-0.parquet: "
                                            "free space or use another --campaign")


def test_unexpected_error_is_one_line_exit_1(world, tmp_path, capsys, monkeypatch):
    import stages.label

    def boom(*a, **kw):
        raise KeyError("hw")

    monkeypatch.setattr(stages.label, "run_label", boom)
    assert main(label_args(world, tmp_path / "c")) == 1
    assert "KeyError: 'hw'" in one_line(capsys)
