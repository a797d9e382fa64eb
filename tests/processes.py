"""Jobs as processes, stopped on cue: for the fault tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def stop_when(command: list[str], cwd: Path, ready, sig: int, env: dict | None = None) -> tuple[int, str]:
    """Start the job in its own process group and send `sig` to the whole group (driver and the Ray
    it started) as soon as `ready()` holds. Returns the job's exit code and stderr; whatever is left
    of the group is killed."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
    # Ctrl-C as a terminal's foreground job gets it: a shell without job control starts its background
    # commands (a CI runner's) with SIGINT ignored, which the job would inherit
    job = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, start_new_session=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while not ready():
            assert job.poll() is None, f"the job ended before the fault: {job.stderr.read()[-3000:]}"
            time.sleep(0.05)
        os.killpg(job.pid, sig)
        _, err = job.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    return job.returncode, err
