"""One job at a time in a run directory: RUN/.lock, on a path or at a URI (s3://...).

Two jobs writing one run directory would interleave their stages and state.json. A job takes the
lock before it reads or writes anything there and gives it back when it ends (any ending but a
SIGKILL or a lost machine). The lock names its holder (host, pid, job, start) and carries a
heartbeat rewritten every HEARTBEAT_S seconds. A lock is stale, and taken over with a warning, when
its holder is a process of this host that no longer runs, or when its heartbeat is older than
STALE_AFTER_S (a job on another machine that died with it, or with the network).

On a path a new lock is created whole and atomically (a hard link). Object stores have no such create: there, as
for a takeover, the lock is written, read back after SETTLE_S and kept only if it is still ours, so
of two jobs starting together the last writer wins and the other is refused.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from sisray import storage
from sisray.errors import StorageError

LOCK = ".lock"  # a dot file: never pulled or pushed with the run directory's own files
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0  # four missed heartbeats
SETTLE_S = 1.0


_HELD: set[RunLock] = set()


def release_all() -> None:
    """Give back every lock this process holds: a job that stops on bad input after taking its lock
    (the jobs' common exit path, and at exit)."""
    for lock in list(_HELD):
        lock.release()


atexit.register(release_all)


class RunInUse(StorageError):
    """Another job holds the run directory."""


def _running_here(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:  # a killed process its parent has not reaped yet still answers
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stale_reason(holder: dict, now: float) -> str | None:
    """Why a lock's holder is gone (None: it may still be working)."""
    if holder.get("host") == socket.gethostname():
        if not _running_here(int(holder.get("pid", -1))):
            return f"its process {holder.get('pid')} on this host has ended"
        return None
    age = now - float(holder.get("heartbeat", 0))
    if age > STALE_AFTER_S:
        return f"its heartbeat stopped {age:.0f} s ago (more than {STALE_AFTER_S:.0f} s)"
    return None


class RunLock:
    """`acquire()` or raise RunInUse naming the holder; `release()` (idempotent) at the end."""

    def __init__(self, location: str | Path, job: str):
        self.location = storage.join(storage.absolute(location), LOCK)
        self.remote = storage.is_uri(location)
        self.mine = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "job": job,
                     "since": time.time()}
        self.made_folder = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _read(self) -> dict | None:
        """The holder (None: no lock; {}: a file that is not a lock, nobody's). A lock that exists but
        cannot be read is an error, never taken over."""
        if not storage.is_file(self.location):
            return None
        try:
            return json.loads(storage.read_bytes(self.location))
        except json.JSONDecodeError:
            return {}

    def _write(self) -> None:
        storage.write_bytes(self.location, json.dumps({**self.mine, "heartbeat": time.time()}).encode())

    def _create_here(self) -> bool:
        """Create the lock file on a path, whole and atomically (a hard link of a written file fails
        if the name exists); False when it exists."""
        path = Path(self.location)
        self.made_folder = not path.parent.exists()  # removed again if the job leaves it empty
        path.parent.mkdir(parents=True, exist_ok=True)
        written = path.with_name(f"{LOCK}.{self.mine['owner']}")
        written.write_text(json.dumps({**self.mine, "heartbeat": time.time()}))
        try:
            os.link(written, path)
        except OSError:  # it exists, or the file system has no hard links: the object-store way then
            return False
        finally:
            written.unlink()
        return True

    def acquire(self) -> None:
        if not self.remote and self._create_here():
            return self._start_heartbeat()
        holder = self._read()
        if holder is not None:
            reason = "it is unreadable" if not holder else stale_reason(holder, time.time())
            if reason is None:
                raise RunInUse(in_use(self.location, holder))
            print(f"warning: taking over the stale lock {self.location} ({describe(holder)}): {reason}", flush=True)
        self._write()
        time.sleep(SETTLE_S)  # a job starting at the same moment writes too: the last writer keeps it
        holder = self._read()
        if not holder or holder.get("owner") != self.mine["owner"]:
            raise RunInUse(in_use(self.location, holder or {}))
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    self._write()
                except StorageError:  # a storage hiccup: the next beat tries again
                    pass

        self._beat = threading.Thread(target=beat, name="sisray-run-lock", daemon=True)
        self._beat.start()
        _HELD.add(self)

    def release(self) -> None:
        if self._beat is None:
            return
        self._stop.set()
        self._beat.join()
        self._beat = None
        _HELD.discard(self)
        holder = self._read()
        if holder and holder.get("owner") == self.mine["owner"]:
            fs, path = storage.resolve(self.location)
            try:
                fs.delete_file(path)
            except OSError:  # gone already, or unreachable: stale once its heartbeat is old
                pass
        folder = Path(self.location).parent
        if self.made_folder and not any(folder.iterdir()):
            folder.rmdir()


def describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
    return f"job {holder.get('job', '?')}, pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {since}"


def in_use(location: str, holder: dict) -> str:
    return (f"the run directory is in use: {location} is held by {describe(holder)}. Wait for that job to "
            f"end or give another --run-dir; if that job is dead on another machine, its lock is taken over "
            f"once its heartbeat is {STALE_AFTER_S:.0f} s old, or delete {location}")
