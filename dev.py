#!/usr/bin/env python3
"""Set-up and entry points that need nothing but python3 on a fresh machine.

    python3 dev.py demo    # create/refresh .venv, then run the offline demo (`fmbseg demo`)
    python3 dev.py test    # create/refresh .venv, then run the test suite (`pytest`)
    python3 dev.py setup   # only create/refresh .venv

The virtualenv lives at `.venv` in the repository root. It is rebuilt only when pyproject.toml or
constraints.txt changed since the last install (their hash is kept in .venv/.fmbseg-installed), so a
second run starts at once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".fmbseg-installed"
PY = VENV / "bin" / "python"


def _inputs_hash() -> str:
    h = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()


def setup() -> None:
    want = _inputs_hash()
    if PY.exists() and STAMP.exists() and STAMP.read_text().strip() == want:
        print(f"[dev] .venv is up to date ({VENV})", flush=True)
        return
    t0 = time.time()
    if not PY.exists():
        print(f"[dev] creating virtualenv {VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    print("[dev] installing fmbseg and its dependencies (constraints.txt pins them)", flush=True)
    subprocess.run(
        [str(PY), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}[dev]"],
        check=True,
    )
    STAMP.write_text(want + "\n")
    print(f"[dev] install took {time.time() - t0:.0f} s", flush=True)


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "help"
    rest = argv[1:]
    if cmd not in ("setup", "demo", "test"):
        print(__doc__)
        return 0 if cmd in ("help", "-h", "--help") else 2
    setup()
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if cmd == "demo":
        return subprocess.call([str(VENV / "bin" / "fmbseg"), "demo", *rest], cwd=ROOT, env=env)
    if cmd == "test":
        t0 = time.time()
        rc = subprocess.call([str(PY), "-m", "pytest", *rest], cwd=ROOT, env=env)
        print(f"[dev] tests took {time.time() - t0:.0f} s (exit {rc})", flush=True)
        return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
