"""`fmbseg deploy`: `prefect deploy --all` of this repository's prefect.yaml onto a chosen work pool, optionally
creating the pool and the GPU concurrency limit first.

prefect.yaml names the pool `fmbseg` literally (Prefect's `{{ $VAR }}` templating has no default value). Another
pool name (`--pool`, else `$FMBSEG_WORK_POOL`) is applied by deploying a copy of prefect.yaml with the name
replaced. The GPU limit is a Prefect tag concurrency limit on `GPU_TAG`, the tag every GPU task of the flows
carries (label shards, training, evaluation), so at most N of them run at once across all workers of the server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from flows.cli import UsageError
from flows.gpu import GPU_TAG
from flows.server import prefect_command

DEFAULT_POOL = "fmbseg"
REPO = Path(__file__).resolve().parents[1]


def register(subparsers) -> None:
    d = subparsers.add_parser(
        "deploy", help="deploy the flows of prefect.yaml onto a work pool (optionally creating it and a GPU limit)",
        description="Runs `prefect --no-prompt deploy --all` from the repository against the server in "
        "PREFECT_API_URL. The pool is --pool, else $FMBSEG_WORK_POOL, else 'fmbseg'.")
    d.add_argument("--pool", default=None, help="work pool name (default $FMBSEG_WORK_POOL or 'fmbseg')")
    d.add_argument("--create-pool", action="store_true", help="create the pool (type process) when it is missing")
    d.add_argument("--gpu-limit", type=int, default=None, metavar="N",
                   help=f"create/update the tag concurrency limit '{GPU_TAG}' = N: at most N GPU tasks (shards, "
                   "training, evaluation) run at once on this server; set it to the number of GPUs")
    d.set_defaults(func=cmd_deploy)


def _prefect(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(prefect_command(*args), cwd=REPO, capture_output=True, text=True)
    if check and res.returncode != 0:
        last = ((res.stderr or res.stdout).strip().splitlines() or [""])[-1]
        raise RuntimeError(f"`prefect {' '.join(args)}` failed (exit {res.returncode}): {last}")
    return res


def deployment_file(pool: str) -> str:
    """prefect.yaml's text with the work pool named `pool`."""
    text = (REPO / "prefect.yaml").read_text(encoding="utf-8")
    anchor = f"      name: {DEFAULT_POOL}\n"
    if anchor not in text:
        raise RuntimeError(f"prefect.yaml has no '{anchor.strip()}' pool definition to replace")
    return text.replace(anchor, f"      name: {pool!r}\n".replace("'", '"'), 1)


def cmd_deploy(args) -> int:
    pool = args.pool or os.environ.get("FMBSEG_WORK_POOL") or DEFAULT_POOL
    if not pool.strip() or "{" in pool:
        raise UsageError(f"invalid work pool name {pool!r}")
    if args.gpu_limit is not None and args.gpu_limit < 1:
        raise UsageError("--gpu-limit must be >= 1")
    if args.create_pool and _prefect("work-pool", "inspect", pool, check=False).returncode != 0:
        _prefect("work-pool", "create", pool, "--type", "process")
        print(f"created work pool {pool} (type process)")
    if args.gpu_limit is not None:
        _prefect("concurrency-limit", "create", GPU_TAG, str(args.gpu_limit))
        print(f"tag concurrency limit {GPU_TAG} = {args.gpu_limit}: at most {args.gpu_limit} GPU tasks at once")
    tmp = None
    try:
        cmd = ["--no-prompt", "deploy", "--all"]
        if pool != DEFAULT_POOL:
            fd, tmp = tempfile.mkstemp(prefix=".prefect-deploy-", suffix=".yaml", dir=REPO)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(deployment_file(pool))
            cmd += ["--prefect-file", tmp]
        res = _prefect(*cmd, check=False)
    finally:
        if tmp:
            os.unlink(tmp)
    sys.stdout.write(res.stdout)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        print(f"fmbseg deploy: `prefect deploy --all` failed (exit {res.returncode}); does work pool {pool!r} "
              "exist? (--create-pool creates it)", file=sys.stderr)
        return 1
    print(f"deployed onto work pool {pool}; start a worker with: prefect worker start --pool {pool}")
    return 0
