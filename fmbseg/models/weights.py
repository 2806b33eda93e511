"""Finding, downloading, reading and checking pretrained weights (separate from building the models).

Resolution order for one `WeightsEntry` (`resolve_weights`):
1. an explicit path the user gave (`weights=...`);
2. `$FMBSEG_WEIGHTS_DIR/<entry.filename>` (default `~/.cache/fmbseg/weights`);
3. the file already in the Hugging Face cache, for entries hosted there (no network);
4. a download, unless `FMBSEG_OFFLINE=1` or `HF_HUB_OFFLINE=1`: Hugging Face files with
   `huggingface_hub.hf_hub_download` (into the Hugging Face cache; resumable), the others with
   `torch.hub.download_url_to_file` into the weights directory; the sha256 is checked either way;
5. otherwise one `WeightsNotFoundError` naming the expected file, the directory to put it in and the source.

Reading is always safe: `torch.load(path, map_location="cpu", weights_only=True)` or safetensors. A checkpoint may
be a bare state dict or a dict holding one under "model" / "state_dict"; a DDP "module." prefix is stripped.
`load_into` refuses a state dict whose keys or shapes do not fit the architecture, naming the offenders.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

DEFAULT_WEIGHTS_DIR = "~/.cache/fmbseg/weights"
CONNECT_TIMEOUT_S = 10.0
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class WeightsNotFoundError(FileNotFoundError):
    """The weights file is neither given, nor in the weights directory, nor downloadable."""


class CorruptWeightsError(ValueError):
    """The file exists but cannot be read as a checkpoint (truncated, not a checkpoint, wrong hash)."""


class WeightsMismatchError(ValueError):
    """The checkpoint's parameter names or shapes do not fit the architecture."""


@dataclass(frozen=True)
class WeightsEntry:
    """One pretrained checkpoint: where it comes from and the name it has in the weights directory.

    `source` is a human description (open_clip tag, Hugging Face id, ...); `url` a direct download link;
    `sha256` the official hash when published (checked after download); `hf_repo`/`hf_filename` let a copy
    already in the Hugging Face cache be used offline (`hf_alt_filenames`: other names the same weights are cached
    under, e.g. open_clip's `.bin` twin of its safetensors file); `strip_prefixes` are key prefixes removed on load."""

    key: str
    filename: str
    url: str
    source: str
    sha256: str | None = None
    size_bytes: int | None = None
    hf_repo: str | None = None
    hf_filename: str | None = None
    hf_alt_filenames: tuple[str, ...] = field(default=())
    strip_prefixes: tuple[str, ...] = field(default=())


def weights_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("FMBSEG_WEIGHTS_DIR") or DEFAULT_WEIGHTS_DIR))


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes") for v in ("FMBSEG_OFFLINE", "HF_HUB_OFFLINE"))


def resolve_weights(entry: WeightsEntry, explicit: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """-> the local path of `entry`'s checkpoint, downloading it when allowed (see module docstring)."""
    if explicit is not None:
        return existing_file(explicit, entry.key)
    found = find_local(entry)
    if found is not None:
        return found
    local = weights_dir() / entry.filename
    if offline():
        reason = "offline mode (FMBSEG_OFFLINE/HF_HUB_OFFLINE) forbids downloading"
    else:
        try:
            return download(entry, local, progress=progress)
        except CorruptWeightsError:
            raise
        except Exception as e:  # noqa: BLE001 - network, HTTP and hub errors all mean "not downloadable now"
            reason = f"download failed: {type(e).__name__}: {e}".splitlines()[0]
    raise WeightsNotFoundError(
        f"weights for {entry.key} not found: expected file {entry.filename!r} in {local.parent} "
        f"(put it there, set FMBSEG_WEIGHTS_DIR to its folder, or run `fmbseg weights download --preset P` where "
        f"the machine is online); {reason}; get it from {entry.url} ({entry.source}"
        + (f", sha256 {entry.sha256}" if entry.sha256 else "")
        + ")"
    )


def find_local(entry: WeightsEntry) -> Path | None:
    """The checkpoint already on this machine, without any network: `$FMBSEG_WEIGHTS_DIR/<filename>`, else the
    file in the Hugging Face cache (entries hosted there); None when neither has it."""
    local = weights_dir() / entry.filename
    if local.is_file():
        return local
    return _hf_cached(entry)


def search_locations(entry: WeightsEntry) -> list[str]:
    """Where `find_local` looks for `entry`, in order (for `fmbseg weights list`)."""
    places = [str(weights_dir() / entry.filename)]
    if entry.hf_repo and entry.hf_filename:
        from huggingface_hub import constants

        places.append(f"Hugging Face cache {constants.HF_HUB_CACHE} ({entry.hf_repo}: "
                      + ", ".join((entry.hf_filename, *entry.hf_alt_filenames)) + ")")
    return places


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """An explicit weights path given by the user: it must be a file."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise WeightsNotFoundError(f"weights file {p} (given for {what}) does not exist or is not a file")
    return p


def _hf_cached(entry: WeightsEntry) -> Path | None:
    if not (entry.hf_repo and entry.hf_filename):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in (entry.hf_filename, *entry.hf_alt_filenames):
        found = try_to_load_from_cache(entry.hf_repo, filename)
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


def download(entry: WeightsEntry, dest: Path, progress: bool = True) -> Path:
    """Download `entry`; -> the local path. The file appears only once it is whole and its sha256 is right.

    Files hosted on Hugging Face go through `huggingface_hub.hf_hub_download` into the Hugging Face cache (it
    resumes interrupted transfers, caches, and honours `HF_ENDPOINT`/`HF_TOKEN`); their sha256 is the LFS etag the
    hub reports (the cached blob's name), checked here, else `entry.sha256`. Other files (the SAM release) go
    through `torch.hub.download_url_to_file` into `dest` with `entry.sha256` checked. A mismatch raises
    `CorruptWeightsError` and leaves no file behind."""
    if entry.hf_repo and entry.hf_filename:
        return _download_hf(entry, progress)
    from torch.hub import download_url_to_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"fmbseg: downloading {entry.key} from {entry.url} to {dest}", flush=True)
    try:
        download_url_to_file(entry.url, str(dest), hash_prefix=entry.sha256, progress=progress)
    except RuntimeError as e:
        if "invalid hash value" not in str(e):
            raise
        raise CorruptWeightsError(
            f"download of {entry.url} has the wrong sha256 ({e}); the file was discarded"
        ) from None
    if entry.size_bytes is not None and dest.stat().st_size != entry.size_bytes:
        size = dest.stat().st_size
        dest.unlink()
        raise CorruptWeightsError(f"download of {entry.url} has {size} bytes, expected {entry.size_bytes}; discarded")
    return dest


def _download_hf(entry: WeightsEntry, progress: bool) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    endpoint = os.environ.get("HF_ENDPOINT") or None  # read per call (the library reads it once, at import)
    print(f"fmbseg: downloading {entry.key} from Hugging Face {entry.hf_repo}/{entry.hf_filename}", flush=True)
    if not progress:
        disable_progress_bars()
    try:
        path = Path(hf_hub_download(entry.hf_repo, entry.hf_filename, endpoint=endpoint, etag_timeout=CONNECT_TIMEOUT_S))
    finally:
        if not progress:
            enable_progress_bars()
    blob = Path(os.path.realpath(path))
    # An LFS file's cached blob is named by its sha256 (the hub's X-Linked-Etag); a non-LFS blob by its git hash.
    expected = entry.sha256 or (blob.name if _HEX64.match(blob.name) else None)
    got = file_sha256(path)
    if expected and got != expected:
        for p in (path, blob):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        raise CorruptWeightsError(
            f"download of {entry.hf_repo}/{entry.hf_filename} has sha256 {got}, expected {expected}; the file was "
            "discarded"
        )
    return path


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _file_key(path: Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, computed once per (real path, size, mtime) in this process."""
    key = _file_key(Path(path))
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips holding compiled code next to the tensors (torch.load's own test)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def read_state_dict(path: str | os.PathLike, strip_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat `{name: tensor}` dict on the CPU, without unpickling code.

    Accepts safetensors, or a torch file holding a state dict directly or under "model" / "state_dict"."""
    path = Path(path)
    if path.suffix != ".safetensors" and _is_torchscript(path):
        raise CorruptWeightsError(
            f"{path} is a TorchScript archive (like OpenAI's original CLIP .pt files), which fmbseg does not "
            "unpickle; use the open_clip state dict (see `python -m fmbseg.models.registry --list`) or convert it "
            f"once with `python -m fmbseg.models.weights convert-torchscript {path} OUT.pt`"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise CorruptWeightsError(f"cannot read weights file {path}: {type(e).__name__}: {e}".splitlines()[0]) from e
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptWeightsError(
            f"weights file {path} does not hold a state dict (a mapping of parameter names to tensors, "
            "bare or under 'model'/'state_dict'); got " + type(obj).__name__
        )
    sd = dict(obj)
    for prefix in ("module.", *strip_prefixes):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _few(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return f"{len(names)} ({shown}{', ...' if len(names) > n else ''})"


def check_state_dict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """-> human-readable problems (empty when the state dict fits `module` exactly)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if wrong:
        problems.append(f"wrong-shape keys (file vs model): {_few(wrong, 3)}")
    return problems


def load_into(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, path) -> None:
    """Copy `state_dict` into `module`, refusing any mismatch with an error naming the keys."""
    problems = check_state_dict(module, state_dict)
    if problems:
        raise WeightsMismatchError(
            f"weights file {path} does not fit the {what} architecture: " + "; ".join(problems)
        )
    module.load_state_dict(state_dict, strict=True)


def load_weights(
    module: torch.nn.Module,
    path: str | os.PathLike,
    what: str,
    strip_prefixes: tuple[str, ...] = (),
    convert: Callable[[dict[str, torch.Tensor], torch.nn.Module], dict[str, torch.Tensor]] | None = None,
) -> str:
    """Read, (optionally) rename keys with `convert`, check and load a checkpoint into `module`;
    -> the file's sha256."""
    sd = read_state_dict(path, strip_prefixes)
    if convert is not None:
        sd = convert(sd, module)
    load_into(module, sd, what, path)
    return file_sha256(path)


def convert_torchscript(src: str, dst: str) -> None:
    """Turn a TorchScript CLIP archive (OpenAI's .pt) into a plain state dict file fmbseg can read.

    This runs `torch.jit.load`, so only use it on files you trust; fmbseg's own loading never does."""
    archive = torch.jit.load(src, map_location="cpu")
    sd = {k: v for k, v in archive.state_dict().items() if k not in ("input_resolution", "context_length", "vocab_size")}
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    torch.save(sd, dst)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fmbseg.models.weights")
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert-torchscript", help="TorchScript CLIP .pt -> plain state dict (trusted files only)")
    conv.add_argument("src")
    conv.add_argument("dst")
    args = parser.parse_args(argv)
    convert_torchscript(args.src, args.dst)
    print(f"wrote {args.dst} (sha256 {file_sha256(args.dst)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
