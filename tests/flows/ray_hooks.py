"""Ray `worker_process_setup_hook` of the Ray tests: runs once in every Ray worker process the test's job starts.

It wraps two functions of `stages.label` in the worker:
- `commit_shard`: every commit appends `<shard_id> <pid>` to `$FMBSEG_RAY_HOOK_DIR/commits` (O_APPEND, one line
  per write), so a test can tell that no shard was committed twice;
- with `FMBSEG_RAY_HOOK_MODE=kill`, `fmbseg.stage1.check_stage1_inputs` (called for every image by the
  serial and the pipelined loop): the first image labelled anywhere in the
  cluster (claimed with O_EXCL, so exactly one process wins) writes this process's pid to
  `$FMBSEG_RAY_HOOK_DIR/victim.pid` and then waits; the test kills that pid with SIGKILL. No timing luck: the
  worker is mid-shard (models loaded, shard not committed) when the file appears, and it never gets further.
"""

from __future__ import annotations

import os
import time


def install() -> None:
    import fmbseg.stage1
    import stages.label

    hook_dir = os.environ["FMBSEG_RAY_HOOK_DIR"]
    real_commit = stages.label.commit_shard

    def logging_commit(root, shard_id, *args, **kwargs):
        marker = real_commit(root, shard_id, *args, **kwargs)
        fd = os.open(os.path.join(hook_dir, "commits"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{shard_id} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
        return marker

    stages.label.commit_shard = logging_commit

    if os.environ.get("FMBSEG_RAY_HOOK_MODE") != "kill":
        return
    real_stage1 = fmbseg.stage1.check_stage1_inputs

    def stalling_stage1(*args, **kwargs):
        try:
            fd = os.open(os.path.join(hook_dir, "claimed"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return real_stage1(*args, **kwargs)
        os.close(fd)
        tmp = os.path.join(hook_dir, f".victim-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, os.path.join(hook_dir, "victim.pid"))
        time.sleep(300)  # the test kills this process long before
        raise RuntimeError("the test did not kill this worker")

    fmbseg.stage1.check_stage1_inputs = stalling_stage1
