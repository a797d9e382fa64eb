"""Where a job's files live: a local (or NFS) path, or a URI that pyarrow.fs opens (s3://, gs://...).

Files in the run directory are written atomically: a killed job leaves the old file or the new one.
A run directory at a URI is worked on through a local copy (`RunStore`): pulled when the job
starts, pushed after every finished stage, state.json last, so the remote copy never records a
stage whose files it lacks. Ray workers on other nodes read a stage's inputs (checkpoints, patch
sets) from the remote copy, and Ray Train writes its checkpoints there directly.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from sisray.errors import StorageError
from sisray.rundir import STATE

CACHE_ENV = "SISRAY_CACHE_DIR"  # where local copies of remote run directories are kept
TRAIN_FOLDER = "train"  # RUN/<stage>/train/: Ray Train's own files, at the remote location directly


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


@contextlib.contextmanager
def write_failure_as_error(what: str, folder: str | Path):
    """A write that fails for want of space or quota, or of permission (a read-only or unwritable
    run directory), becomes a StorageError naming what and where, and how to go on."""
    try:
        yield
    except OSError as exc:
        elsewhere = exc.filename and not Path(exc.filename).resolve().is_relative_to(Path(folder).resolve())
        if exc.errno not in DISK_FULL and (exc.errno not in UNWRITABLE or elsewhere):  # e.g. a dataset file unreadable
            raise
        where = exc.filename or folder
        problem, fix = (("no space left writing to", "Free space") if exc.errno in DISK_FULL
                        else ("cannot write to", f"Make {folder} writable"))
        raise StorageError(f"{what}: {problem} {where} ({exc.strerror or exc}). {fix} and run the same command "
                           "again: it resumes from the last finished stage") from None


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a file at a path (atomically) or a URI (one put: an object appears whole)."""
    if not is_uri(location):
        return atomic_write_bytes(location, data)
    fs, path = resolve(location)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as exc:
        raise StorageError(f"{location}: cannot write ({exc})") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ------------------------------------------------------------------------------- locations

def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def absolute(location: str | Path) -> str:
    """A path made absolute (Ray workers do not share the driver's cwd); a URI as it is."""
    return str(location) if is_uri(location) else str(Path(location).expanduser().resolve())


def join(location: str | Path, *parts: str) -> str:
    """A location below `location`; a URI keeps its query (e.g. ?endpoint_override=...)."""
    if not is_uri(location):
        return str(Path(location).joinpath(*parts))
    base, mark, query = str(location).partition("?")
    return "/".join([base.rstrip("/"), *parts]) + mark + query


def resolve(location: str | Path):
    """(pyarrow filesystem, path inside it) of a location."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), absolute(location)
    try:
        return pafs.FileSystem.from_uri(str(location))
    except (ValueError, OSError) as exc:
        raise StorageError(f"{location}: cannot open this location ({exc})") from None


def _info(location: str | Path):
    fs, path = resolve(location)
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise StorageError(f"{location}: cannot read ({exc})") from None


def is_file(location: str | Path) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type == pafs.FileType.File


def is_dir(location: str | Path) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type == pafs.FileType.Directory


def read_bytes(location: str | Path) -> bytes:
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, FileNotFoundError) as exc:
        raise StorageError(f"{location}: cannot read ({exc})") from None


def list_files(location: str | Path, suffix: str = "") -> list[str]:
    """The files directly in a folder whose names end with `suffix`, sorted, as locations."""
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"{location}: cannot list ({exc})") from None
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))
    return [join(location, name) for name in names]


# ------------------------------------------------------------------------------- run directories

def _synced(relative: str) -> bool:
    """A run directory's own files: not Ray Train's folders (remote already, or its own business)
    and not staging files (names starting with a dot)."""
    parts = relative.split("/")
    return not any(p.startswith(".") for p in parts) and not (len(parts) > 2 and parts[1] == TRAIN_FOLDER)


def run_files(folder: Path) -> dict[str, os.stat_result]:
    """The run directory's own files under `folder` (relative POSIX path -> stat)."""
    if not folder.is_dir():
        return {}
    files = {p.relative_to(folder).as_posix(): p.stat() for p in folder.rglob("*") if p.is_file()}
    return {k: v for k, v in files.items() if _synced(k)}


class RunStore:
    """A run directory: `local` is where the driver reads and writes it. For a URI, `local` is a
    copy under $SISRAY_CACHE_DIR (default ~/.cache/sisray) kept in step with `pull` and `push`."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        self.remote = resolve(self.location) if is_uri(self.location) else None
        if self.remote is None:
            self.local = Path(self.location).expanduser().resolve()
        else:
            digest = hashlib.sha1(self.location.partition("?")[0].encode()).hexdigest()[:16]
            cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sisray")
            self.local = cache / "runs" / digest

    def shared(self, path: str | Path) -> str:
        """Where workers on any node find `path` (a path in the local copy)."""
        path = Path(path).resolve()
        if self.remote is None:
            return str(path)
        return join(self.location, *path.relative_to(self.local).parts)

    def train_storage(self, stage: str) -> tuple[str, Any]:
        """(storage_path, storage_filesystem) for Ray Train's files of a stage: RUN/<stage>/."""
        if self.remote is None:
            return str(self.local / stage), None
        fs, root = self.remote
        return f"{root}/{stage}", fs

    def _remote_files(self) -> dict[str, Any]:
        import pyarrow.fs as pafs

        fs, root = self.remote
        try:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        except OSError as exc:
            raise StorageError(f"{self.location}: cannot list ({exc})") from None
        files = {i.path[len(root) + 1:]: i for i in infos if i.type == pafs.FileType.File}
        return {k: v for k, v in files.items() if _synced(k)}

    def _local_files(self) -> dict[str, os.stat_result]:
        return run_files(self.local)

    @staticmethod
    def _same(stat: os.stat_result, info) -> bool:
        return stat.st_size == info.size and info.mtime_ns is not None and stat.st_mtime_ns == info.mtime_ns

    def pull(self) -> None:
        """Make the local copy equal to the remote run directory (nothing to do for a local path)."""
        if self.remote is None:
            return
        fs = self.remote[0]
        remote, local = self._remote_files(), self._local_files()
        for name in local.keys() - remote.keys():
            (self.local / name).unlink()
        try:
            for name, info in remote.items():
                if name in local and self._same(local[name], info):
                    continue
                with fs.open_input_stream(info.path) as f:
                    atomic_write_bytes(self.local / name, f.read())
                os.utime(self.local / name, ns=(info.mtime_ns, info.mtime_ns))
        except OSError as exc:
            raise StorageError(f"{self.location}: cannot read ({exc})") from None

    def push(self) -> None:
        """Upload what changed in the local copy, delete remote files the copy no longer has (a re-run
        stage may write fewer shards), and upload state.json last."""
        if self.remote is None:
            return
        remote, local = self._remote_files(), self._local_files()
        changed = [n for n, s in local.items() if n not in remote or not self._same(s, remote[n])]
        try:
            for name in changed:
                if name != STATE:
                    self._upload(name)
            for stale in remote.keys() - local.keys():
                self.remote[0].delete_file(f"{self.remote[1]}/{stale}")
            if STATE in changed:
                self._upload(STATE)
        except OSError as exc:
            raise StorageError(f"{self.location}: cannot write ({exc})") from None

    def _upload(self, name: str) -> None:
        fs, root = self.remote
        target = f"{root}/{name}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(target) as f:
            f.write((self.local / name).read_bytes())
        mtime = fs.get_file_info(target).mtime_ns  # the local copy takes the remote time: in step
        os.utime(self.local / name, ns=(mtime, mtime))
