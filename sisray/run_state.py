"""RUN/state.json: which stages of a run finished, in how many seconds and Ray passes (Ray Data
passes, Ray tasks, Ray Train fits), and the digests of the files each wrote; the config fingerprint that a resumed job must match. A stage whose files no longer
match is redone, with every stage after it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from sisray.cluster import passes_run
from sisray.config import Config, config_to_dict
from sisray.errors import ConfigError
from sisray.rundir import BOOKKEEPING, STATE
from sisray.storage import RunStore, atomic_write_json, write_failure_as_error, run_files
from sisray.tracking import flatten

# Keys that change where or how fast a job runs, not what it computes: a run may resume with others.
NOT_RESULT_KEYS = ("run_dir", "tracking.", "resources.", "train.log_every", "train.checkpoint_every")
DIGEST_WHOLE = 64 << 20  # files up to this size are hashed whole
DIGEST_PART = 8 << 20


def fingerprint(cfg: Config) -> dict:
    """The config keys that determine a run's results."""
    return {k: v for k, v in flatten(config_to_dict(cfg)).items() if not k.startswith(NOT_RESULT_KEYS)}


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of the files a stage's record covers: the run's files but its bookkeeping."""
    return {k: (v.st_size, v.st_mtime_ns) for k, v in run_files(folder).items()
            if k not in BOOKKEEPING}


def file_digest(path: Path) -> str:
    """size:sha256 of the file; past 64 MB (checkpoints) of its first and last 8 MB, which a partial
    write changes (and torch.load checks the rest)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= DIGEST_WHOLE:
            digest.update(f.read())
        else:
            digest.update(f.read(DIGEST_PART))
            f.seek(size - DIGEST_PART)
            digest.update(f.read())
    return f"{size}:{digest.hexdigest()}"


class RunState:
    """RUN/state.json: the config fingerprint, finished stages with their seconds and the digests of
    the files each wrote, the MLflow run. A finished stage whose files no longer match (a partial
    write, a deleted or edited file) is redone, with every stage after it."""

    def __init__(self, store: RunStore, cfg: Config, force: bool = False):
        self.store = store
        self.path = store.local / STATE
        self.data = {"fingerprint": fingerprint(cfg), "finished": {}, "outputs": {}, "mlflow_run_id": None}
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            # a key an earlier sisray did not have: that run behaved as its default does
            old, new = {**fingerprint(Config()), **saved["fingerprint"]}, self.data["fingerprint"]
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            if changed and not force:
                listed = "; ".join(f"{k} = {old.get(k)!r} there, {new.get(k)!r} now" for k in changed[:5])
                raise ConfigError(f"{store.location} holds a run made with another config ({listed}). Use another --run-dir, "
                                  f"resume it with --resume {store.location}, or pass --force to continue it anyway")
            saved["fingerprint"] = self.data["fingerprint"]
            saved.setdefault("outputs", {})
            self.data = saved
            self._drop_unverified()

    @property
    def mlflow_run_id(self) -> str | None:
        return self.data["mlflow_run_id"]

    @mlflow_run_id.setter
    def mlflow_run_id(self, run_id: str | None) -> None:
        self.data["mlflow_run_id"] = run_id
        self.save()

    def finished(self, stage: str) -> bool:
        return stage in self.data["finished"]

    def seconds(self, stage: str) -> float | None:
        return self.data["finished"].get(stage)

    def passes(self, stage: str) -> int:
        """The Ray passes a finished stage ran (0 if it did not run, or ran before sisray counted them)."""
        return self.data.get("passes", {}).get(stage, 0)

    def run(self, stage: str, work: Callable[[], object]) -> None:
        """Run a stage unless it finished before; record it once it has."""
        if self.finished(stage):
            return
        print(f"== {stage}", flush=True)
        before = _listing(self.store.local)
        began, passes = time.perf_counter(), passes_run()
        with write_failure_as_error(f"stage {stage}", self.store.local):  # its partial files are removed on the way
            work()
        self.data["finished"][stage] = round(time.perf_counter() - began, 2)
        self.data.setdefault("passes", {})[stage] = passes_run() - passes
        written = sorted(k for k, v in _listing(self.store.local).items() if before.get(k) != v)
        self.data["outputs"][stage] = {k: file_digest(self.store.local / k) for k in written}
        self.save()

    def records(self, prefix: str) -> dict[str, dict]:
        """The finished stages named PREFIX*: their seconds, Ray passes and the digests of their files."""
        return {stage: {"seconds": seconds, "passes": self.passes(stage),
                        "outputs": self.data["outputs"].get(stage, {})}
                for stage, seconds in self.data["finished"].items() if stage.startswith(prefix)}

    def adopt(self, records: dict[str, dict], origin: str) -> list[str]:
        """Record stages another run finished (their files copied here first, sisray/stage_cache.py):
        they took no time and no Ray pass here, and are redone if a copy does not match its digest.
        The stages kept."""
        for stage, record in records.items():
            self.data["finished"][stage] = 0.0
            self.data.setdefault("passes", {})[stage] = 0
            self.data["outputs"][stage] = record["outputs"]
        self._drop_unverified()
        kept = [stage for stage in records if self.finished(stage)]
        self.data.setdefault("adopted", {}).update({stage: origin for stage in kept})
        self.save()
        return kept

    def _drop_unverified(self) -> None:
        """Forget the first finished stage whose files do not match their digests, and every later one."""
        stages = list(self.data["finished"])
        for i, stage in enumerate(stages):
            for name, digest in self.data["outputs"].get(stage, {}).items():
                path = self.store.local / name
                found = file_digest(path) if path.is_file() else "missing"
                if found != digest:
                    problem = "is missing" if found == "missing" else "differs from what it wrote"
                    print(f"warning: {path} {problem} ({stage}): redoing {stage} and the "
                          f"{len(stages) - i - 1} stage(s) after it", flush=True)
                    for later in stages[i:]:
                        self.data["finished"].pop(later)
                        self.data["outputs"].pop(later, None)
                        self.data.get("passes", {}).pop(later, None)
                        self.data.get("adopted", {}).pop(later, None)
                    return

    def save(self) -> None:
        """Write state.json; a remote run directory receives the stage's files first, then it."""
        with write_failure_as_error("recording the run's state", self.path.parent):  # the previous state.json stays
            atomic_write_json(self.path, self.data)
        self.store.push()
