"""Fault-injection points in the commit path, for tests that must not depend on lucky timing.

`checkpoint(name)` does nothing unless the environment asks for it:
- `FMBSEG_FAULT_KILL=name` — the process kills itself with SIGKILL when it reaches `name` (a crash there);
- `FMBSEG_FAULT_PAUSE=name` with `FMBSEG_FAULT_DIR=dir` — the process writes `dir/name.reached` (its pid in it)
  and waits until `dir/name.go` exists, so a test can line up two writers at chosen points.
Several names may be given, comma-separated. Points: `staged` (all outputs staged, marker not written),
`committed` (marker written, nothing published), `publishing` (one output published), `published` (all
published, the attempt directory not yet removed), `computing` (label_shard passed its done check).
"""

from __future__ import annotations

import os
import signal
import time


def _names(var: str) -> set[str]:
    return {n.strip() for n in os.environ.get(var, "").split(",") if n.strip()}


def checkpoint(name: str) -> None:
    if not os.environ.get("FMBSEG_FAULT_KILL") and not os.environ.get("FMBSEG_FAULT_PAUSE"):
        return
    if name in _names("FMBSEG_FAULT_PAUSE"):
        d = os.environ["FMBSEG_FAULT_DIR"]
        with open(os.path.join(d, f"{name}.reached"), "w") as f:
            f.write(str(os.getpid()))
        go = os.path.join(d, f"{name}.go")
        deadline = time.monotonic() + 300
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.01)
    if name in _names("FMBSEG_FAULT_KILL"):
        os.kill(os.getpid(), signal.SIGKILL)
