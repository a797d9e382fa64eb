"""Stages one run finished, reused by another whose config differs only in keys those stages do not
read: a sweep's trials share their source stages (the source model's evaluations, its target
BatchNorm statistics, their scores of the target-train images), which are the same in every trial
that sweeps only what the rounds read.

An entry is a folder CACHE/<key>/ holding the stages' files (at their paths in the run directory)
and stages.json (each stage's record from RUN/state.json). It is written whole in a hidden folder,
then renamed into place, so a reader finds all of it or nothing. The key hashes the run's config
fingerprint without the keys the stages do not read: a key missing from that list costs a
recomputation, never a wrong reuse; and the copied files must match the digests their stages
recorded, or the stages are redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from sisray.config import Config
from sisray.run_state import RunState, fingerprint

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
    first run to finish them publishes; another's identical copy is dropped)."""
    if entry.exists():
        return
    records = state.records(prefix)
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        _copy_files({name for record in records.values() for name in record["outputs"]}, state.store.local, staging)
        (staging / RECORDS).write_text(json.dumps(records, indent=1))
        os.rename(staging, entry)
    except OSError:
        if not entry.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def adopt(state: RunState, entry: Path) -> list[str]:
    """Copy ENTRY's files into the run and record its stages as finished here; the stages adopted
    ([] without an entry, or when the run finished any of them itself: it goes on on its own)."""
    if not (entry / RECORDS).is_file():
        return []
    records = json.loads((entry / RECORDS).read_text())
    if any(state.finished(stage) for stage in records):
        return []
    _copy_files({name for record in records.values() for name in record["outputs"]}, entry, state.store.local)
    return state.adopt(records, str(entry))
