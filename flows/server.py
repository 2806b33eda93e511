"""A local Prefect server, a `process` work pool and workers, started and stopped from Python.

Used by `fmbseg demo` (a temporary server when `PREFECT_API_URL` is not set) and by the end-to-end tests. The
server binds 127.0.0.1 only and keeps its database under its own `PREFECT_HOME`, so it never touches the user's
`~/.prefect`. Every process started here runs in its own session (process group), so it can be stopped with
everything it spawned; Prefect's process worker starts each flow run in a further session of its own, which is
why `kill_tree` walks descendants through `/proc` rather than trusting one process group (Linux).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Sequence

HOST = "127.0.0.1"


def prefect_executable() -> str:
    """The `prefect` console script of this interpreter's environment (falls back to `python -m prefect`)."""
    candidate = Path(sys.executable).with_name("prefect")
    return str(candidate) if candidate.is_file() else ""


def prefect_command(*args: str) -> list[str]:
    exe = prefect_executable()
    return [exe, *args] if exe else [sys.executable, "-m", "prefect", *args]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def prefect_env(api_url: str, home: str | os.PathLike, base: dict[str, str] | None = None, **extra: str) -> dict:
    """The environment a `prefect` subprocess needs to talk to the server at `api_url` with its own home."""
    env = dict(os.environ if base is None else base)
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_HOME=os.fspath(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # Workers poll every second instead of every 10 s: a submitted run starts promptly.
        PREFECT_WORKER_QUERY_SECONDS=env.get("PREFECT_WORKER_QUERY_SECONDS", "1"),
        PREFECT_CLI_PROMPT="false",
    )
    env.update(extra)
    return env


def is_healthy(api_url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


# -- processes ---------------------------------------------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # The command name (field 2) may contain spaces and parentheses: split after its closing parenthesis.
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children first, depth-first), read from /proc."""
    if not os.path.isdir("/proc"):
        return []
    children = _children_map()
    out: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send `sig` to `pid`, every descendant, and their process groups; returns the pids signalled.

    For SIGKILL the tree is first frozen with SIGSTOP (walking again until no new process shows up), so nothing
    forks between the walk and the kill and no orphan escapes to init."""
    procs = [pid, *descendants(pid)]
    if sig == signal.SIGKILL:
        while True:
            for p in procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, signal.SIGSTOP)
            again = [pid, *descendants(pid)]
            if set(again) <= set(procs):
                break
            procs = sorted(set(procs) | set(again))
    groups = set()
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            groups.add(os.getpgid(p))
    groups.discard(os.getpgrp())  # never our own group (a process started without a session of its own)
    for g in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(g, sig)
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)
    return procs


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None when it is gone.

    A pid plus its start time names one process for good: a pid alone may be reused once the process is reaped."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[19])


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process's tree, wait up to `timeout`, then SIGKILL whatever is left; reaps the child."""
    if proc.poll() is None:
        tree = {p: _start_time(p) for p in [proc.pid, *descendants(proc.pid)]}
        kill_tree(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid, signal.SIGKILL)  # not reaped yet, so the pid is still this process's
        # Descendants in sessions of their own (Prefect's flow runs) outlive their parent: kill the survivors,
        # recognised by their start time so a reused pid is never hit.
        for p, started in tree.items():
            if started is not None and _start_time(p) == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


def _spawn(cmd: Sequence[str], env: dict, log: Path, cwd: str | os.PathLike | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    out: IO[bytes] = open(log, "ab")
    try:
        return subprocess.Popen(
            list(cmd), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        out.close()  # the child holds its own descriptor


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# -- server ------------------------------------------------------------------------------------------------------
@dataclass
class LocalServer:
    """A `prefect server start` subprocess on 127.0.0.1 with its own PREFECT_HOME."""

    api_url: str
    home: Path
    process: subprocess.Popen
    log: Path
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def ui_url(self) -> str:
        return self.api_url[: -len("/api")]

    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict:
        return prefect_env(self.api_url, self.home, base, **extra)

    def cli(self, *args: str, cwd: str | os.PathLike | None = None, timeout: float = 300,
            env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run one `prefect ...` command against this server; raises with its output when it fails."""
        res = subprocess.run(
            prefect_command(*args), env=env or self.env(), cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
        if check and res.returncode != 0:
            raise RuntimeError(
                f"`prefect {' '.join(args)}` failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
            )
        return res

    def create_pool(self, name: str, cwd: str | os.PathLike | None = None) -> None:
        """Create a `process` work pool (no-op when it exists)."""
        self.cli("work-pool", "create", name, "--type", "process", "--overwrite", cwd=cwd)

    def start_worker(self, pool: str, cwd: str | os.PathLike, log: Path, name: str | None = None,
                     limit: int | None = None, env: dict | None = None) -> subprocess.Popen:
        """Start `prefect worker start --pool POOL` in its own session; it runs flow runs as subprocesses."""
        args = ["worker", "start", "--pool", pool, "--type", "process", "--install-policy", "never"]
        if name:
            args += ["--name", name]
        if limit:
            args += ["--limit", str(limit)]
        proc = _spawn(prefect_command(*args), env or self.env(), log, cwd=cwd)
        self.workers.append(proc)
        return proc

    def stop(self) -> None:
        for w in self.workers:
            stop_process(w)
        self.workers.clear()
        stop_process(self.process)


def start_server(home: str | os.PathLike, port: int | None = None, timeout: float = 180.0,
                 ui: bool = False) -> LocalServer:
    """Start `prefect server start --host 127.0.0.1` with PREFECT_HOME=`home` and wait until it is healthy."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    api_url = f"http://{HOST}:{port}/api"
    env = prefect_env(api_url, home, PREFECT_SERVER_API_HOST=HOST, PREFECT_SERVER_API_PORT=str(port))
    env.pop("PREFECT_API_URL")  # the server itself must not think it is a client of another server
    log = home / "server.log"
    args = ["server", "start", "--host", HOST, "--port", str(port), "--analytics-off"]
    args.append("--ui" if ui else "--no-ui")
    proc = _spawn(prefect_command(*args), env, log)
    server = LocalServer(api_url=api_url, home=home, process=proc, log=log)
    deadline = time.monotonic() + timeout
    while not is_healthy(api_url, timeout=0.5):
        if proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited ({proc.returncode}) while starting:\n{tail(log)}")
        if time.monotonic() > deadline:
            server.stop()
            raise TimeoutError(f"the Prefect server on {api_url} was not healthy after {timeout:.0f} s:\n{tail(log)}")
        time.sleep(0.25)
    return server


@contextlib.contextmanager
def local_server(home: str | os.PathLike, port: int | None = None, ui: bool = False) -> Iterator[LocalServer]:
    """A temporary local server (and the workers started through it), stopped on exit whatever happens."""
    server = start_server(home, port=port, ui=ui)
    try:
        yield server
    finally:
        server.stop()


def flush_prefect_logs(timeout: float = 5.0) -> None:
    """Send the flow-run logs this process still holds to the API (call before stopping the server)."""
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(Exception):
        APILogWorker.drain_all(timeout=timeout)


@contextlib.contextmanager
def client_settings(api_url: str, home: str | os.PathLike | None = None) -> Iterator[None]:
    """Point this process's Prefect client at `api_url` (and `home`) for the duration of the block."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    updates = {PREFECT_API_URL: api_url}
    if home is not None:
        updates[PREFECT_HOME] = os.fspath(home)
    with temporary_settings(updates=updates):
        yield
