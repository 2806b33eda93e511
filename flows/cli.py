"""The `fmbseg` command line (DESIGN §7): one vocabulary of flags across subcommands.

Each subcommand lives in the module that owns it and registers itself with `register(subparsers)`; heavy
imports happen inside the command functions so `fmbseg --help` stays fast.

Errors are reported here, in one place (`describe_error`), as one line `fmbseg CMD: error: ...` that names the
file and what to do, never a traceback (set `FMBSEG_DEBUG=1` to get one). Exit status:
- 0: the command did its job (including campaigns where some images failed: they are reported);
- 2: usage errors: bad arguments, missing inputs, a refused configuration (`UsageError`, ValueError such as an
  unknown vocabulary/preset/dataset, FileNotFoundError raised by our own checks);
- 1: failures while running: OS errors by errno (ENOSPC, EDQUOT, EROFS, EFBIG, EACCES, ENOTDIR, a file that
  vanished mid-run, ...), corrupt stored data (a Zarr chunk or metadata that does not decode, a truncated
  checkpoint), out of memory, and any unexpected exception;
- 130: interrupted.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
import traceback

import fmbseg

# Modules that register subcommands, in the order `fmbseg --help` lists them.
COMMAND_MODULES = ("flows.commands_label", "flows.commands_relabel", "flows.commands_stage2", "flows.commands_export", "flows.commands_stats",
                   "flows.commands_weights", "flows.commands_deploy", "flows.demo")


class UsageError(Exception):
    """Bad arguments or missing inputs: reported as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmbseg", description="Annotation-free semantic segmentation with vision foundation models."
    )
    parser.add_argument("--version", action="version", version=f"fmbseg {fmbseg.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a command module not written yet
                continue
            raise
        module.register(sub)
    return parser


# -- naming the file an error is about ---------------------------------------------------------------------------
# Local variable names that hold the file being written or read, by preference, in the frame that raised.
_PATH_LOCALS = ("target", "path", "filename", "file_path", "label_path", "dst", "dest", "url", "tmp", "rel")


def _plain(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


def _location_in_traceback(e: BaseException) -> str | None:
    """The file an exception is about when it does not say (`f.write` raising ENOSPC has no filename; a Zarr
    codec error names nothing): the innermost frame holding a path-like local or a Zarr array/store path."""
    found = None
    tb = e.__traceback__
    while tb is not None:
        loc = tb.tb_frame.f_locals
        here = None
        for name in _PATH_LOCALS:
            v = loc.get(name)
            if isinstance(v, os.PathLike):
                v = os.fspath(v)
            if isinstance(v, str) and ("/" in v or os.sep in v):
                here = v
                break
        if here is None:
            for v in loc.values():
                kind = type(v).__name__
                if kind == "StorePath" or (kind in ("Array", "AsyncArray", "Group", "AsyncGroup")
                                           and hasattr(v, "store_path")):
                    here = str(v if kind == "StorePath" else v.store_path)
                    break
        if here is not None:
            found = here
        tb = tb.tb_next
    return _plain(found) if found else None


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _from_zarr(e: BaseException) -> bool:
    """An error raised while decoding stored Zarr data (a codec, or the metadata JSON of a group/array)."""
    tb, modules = e.__traceback__, []
    while tb is not None:
        modules.append(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next
    inner = [m for m in modules if m.startswith(("zarr", "numcodecs"))]
    return bool(inner) or type(e).__module__.startswith(("zarr", "numcodecs"))


def _os_error_message(e: OSError, where: str) -> str:
    name = e.filename if e.filename is not None else _location_in_traceback(e)
    file = f"{os.fsdecode(name)}" if name is not None else "a file"
    if e.filename2 is not None:
        file += f" -> {os.fsdecode(e.filename2)}"
    code = e.errno
    if code == errno.ENOSPC:
        return f"no space left on device writing {file}: free space or use another {where}"
    if code == getattr(errno, "EDQUOT", -1):
        return f"disk quota exceeded writing {file}: free space or use another {where}"
    if code == errno.EROFS:
        return f"read-only file system: cannot write {file}: use a writable {where}"
    if code == errno.EFBIG:
        return (f"file too large for the file system or the process's file-size limit (ulimit -f) writing {file}: "
                f"raise the limit or use another {where}")
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied: {file}: check the owner and mode of the file and its folder"
    if code == errno.EEXIST and name is not None and not os.path.isdir(name):
        return f"{file} is a file, not a directory: {where} must be a folder (or a path that does not exist yet)"
    if code == errno.ENOTDIR:
        return f"{file}: part of this path is a file, not a directory: {where} must be a folder"
    if code == errno.ENOENT:
        return (f"{file} vanished while the command was running (another process working on the same output?): "
                "run the command again")
    if code == errno.EISDIR:
        return f"{file} is a directory, not a file"
    if code == errno.EMFILE or code == errno.ENFILE:
        return f"too many open files opening {file}: raise `ulimit -n`"
    return f"{e.strerror or type(e).__name__} ({errno.errorcode.get(code, code)}): {file}"


def _output_flag(args: argparse.Namespace | None) -> str:
    if args is not None and getattr(args, "campaign", None) and getattr(args, "command", "") != "predict":
        return "--campaign"
    return "--out" if args is not None and getattr(args, "out", None) else "output folder"


def describe_error(e: BaseException, args: argparse.Namespace | None = None) -> tuple[int, str]:
    """(exit status, one-line message) for an exception escaping a command."""
    where = _output_flag(args)
    campaign = getattr(args, "campaign", None) if args is not None else None
    verify = f"`fmbseg verify --campaign {campaign}`" if campaign else "`fmbseg verify --campaign CAMPAIGN`"
    if isinstance(e, UsageError):
        return 2, str(e)
    if isinstance(e, MemoryError):
        return 1, "out of memory: lower FMBSEG_MAX_IMAGE_PIXELS, use fewer workers per machine or a bigger machine"
    if _from_zarr(e) and not isinstance(e, OSError):
        loc = _location_in_traceback(e)
        return 1, (f"corrupt Zarr data{f' in {loc}' if loc else ''} ({type(e).__name__}: {_first_line(e)}): "
                   f"run {verify} (--repair drops the bad shard so `fmbseg label` redoes it)")
    for c in _chain(e):
        # Damaged or changed campaign data and unwritable campaigns: their messages name the file and the repair.
        if type(c).__name__ in ("CheckpointError", "ShardDamaged", "ImageChanged", "PlanDamaged", "CorruptMarker",
                                "CampaignNotWritable"):
            return 1, _first_line(c)
    if isinstance(e, json.JSONDecodeError):
        loc = _location_in_traceback(e)
        return 1, f"corrupt JSON{f' in {loc}' if loc else ''} ({_first_line(e)}): run {verify}"
    if isinstance(e, OSError) and e.errno is not None:
        return 1, _os_error_message(e, where)
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError)):
        return 2, _first_line(e)     # raised by our own checks, with a message: a usage error
    return 1, f"{type(e).__name__}: {_first_line(e)} (set FMBSEG_DEBUG=1 for the traceback)"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"fmbseg {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns exceptions into messages and exit codes
        code, message = describe_error(e, args)
        if os.environ.get("FMBSEG_DEBUG"):
            traceback.print_exc()
        print(f"fmbseg {args.command}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
