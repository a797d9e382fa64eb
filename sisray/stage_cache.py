"""Stages one run finished, reused by another whose config differs only in keys those stages do not
read: a sweep's trials share their source stages (the source model's evaluations, its target
BatchNorm statistics, their scores of the target-train images), which are the same in every trial
that sweeps only what the rounds read.

An entry is a folder CACHE/<key>/ holding the stages' files (at their paths in the run directory)
and stages.json (each stage's record from RUN/state.json). It is written whole in a hidden folder,
then renamed into place, so a reader finds all of it or nothing. The key hashes the run's config
fingerprint without the keys the stages do not read: a key missing from that list costs a
recomputation, never a wrong reuse. Only stages whose files match the digests they recorded are
taken, and a cache that cannot be read or written costs the run its own computation, not a failure.
Entries are not versioned with the code: a sweep resumed after an upgrade that changes what the
source stages compute must be given a new directory (as a resumed run must).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from sisray.config import Config
from sisray.run_state import RunState, file_digest, fingerprint

RECORDS = "stages.json"


def entry_key(cfg: Config, unread: tuple[str, ...]) -> str:
    """The cache key of a run's stages that do not read the config keys `unread`."""
    kept = {k: v for k, v in fingerprint(cfg).items() if k not in unread}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _copy_files(names: set[str], source: Path, destination: Path) -> None:
    for name in sorted(names):
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, destination / name)


def publish(state: RunState, prefix: str, entry: Path) -> None:
    """ENTRY: a copy of the run's finished stages named PREFIX* and their files, unless it exists (the
    first run to finish them publishes; another's identical copy is dropped). A cache that cannot be
    written is said and skipped: the run itself has what it needs."""
    if entry.exists():
        return
    records = state.records(prefix)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    except OSError as error:
        print(f"warning: not sharing the finished {prefix}* stages in {entry}: {error}", flush=True)
        return
    try:
        _copy_files({name for record in records.values() for name in record["outputs"]}, state.store.local, staging)
        (staging / RECORDS).write_text(json.dumps(records, indent=1))
        os.rename(staging, entry)
    except OSError as error:
        if not entry.exists():  # else another run published first
            print(f"warning: not sharing the finished {prefix}* stages in {entry}: {error}", flush=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def verified(entry: Path) -> dict[str, dict]:
    """ENTRY's stages, in order, up to the first whose files are missing or differ from their
    digests ({} without an entry)."""
    try:
        records = json.loads((entry / RECORDS).read_text())
    except (OSError, ValueError):
        return {}
    kept = {}
    for stage, record in records.items():
        if any(not (entry / name).is_file() or file_digest(entry / name) != digest
               for name, digest in record["outputs"].items()):
            print(f"warning: {entry} holds a damaged copy of {stage}: the run does it and what follows", flush=True)
            break
        kept[stage] = record
    return kept


def adopt(state: RunState, entry: Path, on_copied: Callable[[list[str]], None] = lambda stages: None) -> list[str]:
    """Copy ENTRY's verified stages' files into the run, call `on_copied` with their names (to log
    what the stages would have logged), then record them as finished here; the stages adopted ([]
    without an entry, or when the run finished any of them itself: it goes on on its own)."""
    records = verified(entry)
    if not records or any(state.finished(stage) for stage in records):
        return []
    try:
        _copy_files({name for record in records.values() for name in record["outputs"]}, entry, state.store.local)
    except OSError as error:
        print(f"warning: not taking the stages in {entry}: {error}", flush=True)
        return []
    on_copied(list(records))
    return state.adopt(records, str(entry))
