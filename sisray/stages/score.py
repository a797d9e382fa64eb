"""The scoring pass (docs/METHOD.md step 1) on Ray Data, and the scores file it writes.

An actor pool (one model per actor) turns target-train images into the small per-image records of
`sisray.lse.records`; softmax maps never leave an actor. The driver streams the records into
RUN/round_XX/scores.parquet, ordered by image index, so nothing depends on the number of actors,
the batch size or the order in which blocks finish.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sisray.cluster import stage_errors
from sisray.config import Config, with_absolute_paths
from sisray.datasets import open_target
from sisray.errors import SisrayError
from sisray.labels import NUM_CLASSES
from sisray.lse.records import image_records
from sisray.models import checkpoint_file
from sisray.progress import Progress
from sisray.stages.actors import ActorSpec, ModelActor, arrow_table, image_ids, pool_options


@dataclass(frozen=True)
class PassSpec(ActorSpec):
    round: int = 0


RECORD_KEYS = ("counts", "scores", "mean_entropy", "histograms")


class Scorer(ModelActor):
    """{"id"} -> per-image records (counts, scores, mean_entropy, histograms) and `error`: empty, or
    why the image was skipped (only with the target's `skip_bad_pairs`; its records stay zero)."""

    def __call__(self, batch: dict) -> dict:
        return self.rows([int(i) for i in batch["id"]])

    def blank(self, n: int) -> dict:
        """n rows of records, all zero (what a skipped image keeps)."""
        bins = self.cfg.lse.threshold.bins
        return {"index": np.zeros(n, np.int64), "sample_id": np.full(n, "", object),
                "counts": np.zeros((n, NUM_CLASSES), np.int64), "scores": np.zeros((n, NUM_CLASSES), np.float32),
                "mean_entropy": np.zeros((n, NUM_CLASSES), np.float32),
                "histograms": np.zeros((n, NUM_CLASSES, bins), np.int64), "error": np.full(n, "", object)}

    def rows(self, indices: list[int]) -> dict:
        """The records of the target-train images `indices`, in that order."""
        images, errors = self.load_images(indices)
        out = self.blank(len(indices))
        out["index"][:] = indices
        out["sample_id"][:] = [self.dataset.samples[i].id for i in indices]
        out["error"][:] = [errors.get(i, "") for i in indices]
        rows = [k for k, i in enumerate(indices) if i in images]
        if rows:
            records = image_records(self.teacher([images[indices[k]] for k in rows]), self.cfg.lse.threshold.bins)
            for key in RECORD_KEYS:
                out[key][rows] = getattr(records, key).cpu().numpy()
        return out


class ScoresWriter:
    """Streams scoring records, in whatever order actors return them, into a scores file: written
    beside it and renamed once every image has its record (never half a file); an image returned
    twice (a retried actor) is an error."""

    def __init__(self, out: Path, images: int):
        self.out, self.staging = out, out.with_name(f".{out.name}.tmp")
        self.seen = np.zeros(images, bool)
        self.progress = Progress("scoring", images)
        self.writer: pq.ParquetWriter | None = None
        out.parent.mkdir(parents=True, exist_ok=True)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        index = batch["index"]
        if not len(index):  # a batch of the other split of a pass that also evaluates
            return
        if self.seen[index].any():
            raise SisrayError(f"scoring returned image {int(index[self.seen[index]][0])} twice")
        self.seen[index] = True
        table = arrow_table(batch)
        self.writer = self.writer or pq.ParquetWriter(self.staging, table.schema)
        self.writer.write_table(table)
        self.progress.advance(len(index))

    def __enter__(self) -> ScoresWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if self.writer:
            self.writer.close()
        complete = kind is None and self.seen.all()
        if not complete:
            self.staging.unlink(missing_ok=True)
        if kind is None and not complete:
            raise SisrayError(f"scoring returned no record for {int((~self.seen).sum())} of {len(self.seen)} images")
        if complete:
            self.staging.replace(self.out)


def score_pass(cfg: Config, checkpoint: str | Path, out: Path) -> dict:
    """Score every target-train image; writes `out` (Parquet) atomically and returns its tables
    (`read_scores`)."""
    cfg = with_absolute_paths(cfg)
    dataset = open_target(cfg.data.target, "train", with_labels=False)
    actors, options = pool_options(cfg, len(dataset))
    spec = PassSpec(cfg, str(checkpoint_file(checkpoint)), actors.threads_each, actors.use_gpu)
    results = image_ids(range(len(dataset))).map_batches(Scorer, fn_constructor_kwargs={"spec": spec}, **options)
    with ScoresWriter(out, len(dataset)) as writer, stage_errors("scoring"):
        for batch in results.iter_batches(batch_format="numpy", batch_size=None):
            writer.add(batch)
    return scores_written(out)


def scores_written(out: Path) -> dict:
    """The tables of a scores file just written (`read_scores`), and a line on the images it skipped."""
    tables = read_scores(out)
    if tables["skipped"]:
        print(f"scoring: skipped {len(tables['skipped'])} unreadable image(s) (skip_bad_pairs), e.g. "
              f"{next(iter(tables['skipped'].values()))}", flush=True)
    return tables


def read_scores(scores_file: Path) -> dict:
    """The (N, C) tables of a scores file ordered by image index (counts, scores, mean_entropy), the
    sample ids, and `skipped` ({sample id: error} of images skipped with `skip_bad_pairs`)."""
    table = pq.read_table(scores_file, columns=["index", "sample_id", "counts", "scores", "mean_entropy", "error"])
    order = np.argsort(table.column("index").to_numpy())
    tables = {key: np.asarray(table.column(key).to_pylist(), dtype)[order]
              for key, dtype in (("counts", np.int64), ("scores", np.float32), ("mean_entropy", np.float32))}
    tables["sample_id"] = np.asarray(table.column("sample_id").to_pylist(), dtype=object)[order]
    errors = np.asarray(table.column("error").to_pylist(), dtype=object)[order]
    tables["skipped"] = {str(i): str(e) for i, e in zip(tables["sample_id"], errors) if e}
    return tables


def read_histograms(scores_file: Path, rows: list[int], bins: int) -> np.ndarray:
    """(N, C, bins) histograms with only `rows` filled (the selected images), read from the scores file."""
    table = pq.read_table(scores_file, columns=["index", "histograms"])
    index = table.column("index").to_numpy()
    wanted = np.isin(index, rows)
    out = np.zeros((int(index.max()) + 1, NUM_CLASSES, bins), np.int64)
    for i, hist in zip(index[wanted], table.column("histograms").filter(pa.array(wanted)).to_pylist()):
        out[i] = np.asarray(hist, np.int64)
    return out
