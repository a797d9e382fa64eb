"""Source stages shared between runs that differ only in what the rounds read (a sweep's trials):
publishing and adopting them (pure file work), and, on the real stages, that none of them reads a
key of rounds.ROUND_KEYS."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sisray import rounds, stage_cache
from sisray.config import Config, config_to_dict, load_config, with_values
from sisray.run_state import RunState, fingerprint
from sisray.storage import RunStore
from sisray.tracking import Tracking, flatten

REPO = Path(__file__).resolve().parents[1]

# a value other than the tests' for every key of rounds.ROUND_KEYS
CHANGED = {"lse.p0": 0.3, "lse.p_step": 0.1, "lse.p_max": 0.6, "lse.selection": "global", "lse.min_per_class": 2,
           "lse.threshold.estimator": "quantile", "lse.threshold.window": 3, "lse.threshold.quantile": 0.4,
           "lse.patches_per_image": 3, "lse.zoom_out": True, "lse.entropy_gap": 0.1, "lse.beta": 1.0, "lse.gamma": 1.0,
           "lse.confidence_weight": True, "lse.ema_decay": 0.9, "lse.classmix": True, "lse.online_teacher": None,
           "lse.fourier_style": 0.03,
           "train.round_lr": 1e-3, "train.round_warmup": 0.2, "train.round_bn": "train", "train.epochs_per_round": 3,
           "train.photometric_patches": True}


def test_the_changed_values_cover_every_round_key_and_the_key_ignores_only_those():
    assert set(CHANGED) == set(rounds.ROUND_KEYS)
    assert set(rounds.ROUND_KEYS) <= set(fingerprint(Config()))  # no misspelt key
    base = Config()
    key = stage_cache.entry_key(base, rounds.ROUND_KEYS)
    assert stage_cache.entry_key(with_values(base, CHANGED), rounds.ROUND_KEYS) == key
    for other in ({"lse.scale": 3.0}, {"lse.threshold.bins": 32}, {"lse.target_bn": True}, {"seed": 1},
                  {"validation.images": 8}):
        assert stage_cache.entry_key(with_values(base, other), rounds.ROUND_KEYS) != key, other
    assert stage_cache.entry_key(with_values(base, {"resources.num_actors": 3}), rounds.ROUND_KEYS) == key


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _state(folder: Path, cfg: Config) -> RunState:
    return RunState(RunStore(str(folder)), cfg)


def test_a_run_adopts_the_published_source_stages_and_redoes_one_whose_copy_differs(tmp_path):
    first = _state(tmp_path / "a", Config())
    first.run("source/classes", lambda: _write(tmp_path / "a" / "source" / "classes.json", "{}"))
    first.run("source/eval", lambda: _write(tmp_path / "a" / "source" / "target_bn" / "eval.json", "[1]"))
    first.run("round_01/score", lambda: _write(tmp_path / "a" / "round_01" / "scores.txt", "x"))
    entry = tmp_path / "cache" / "k"
    stage_cache.publish(first, "source/", entry)
    assert sorted(p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file()) == [
        "source/classes.json", "source/target_bn/eval.json", stage_cache.RECORDS]  # not the round's
    late = _state(tmp_path / "late", Config())  # a second run that finished the same stages: the first's stay
    late.run("source/classes", lambda: _write(tmp_path / "late" / "source" / "classes.json", "{ }"))
    stage_cache.publish(late, "source/", entry)
    assert (entry / "source" / "classes.json").read_text() == "{}"

    other = _state(tmp_path / "b", with_values(Config(), {"lse.beta": 0.5}))
    seen = []

    def on_copied(stages):  # before the stages are recorded: a crash here leaves them to be done again
        seen.append((stages, (tmp_path / "b" / "source" / "classes.json").is_file(), other.finished("source/eval")))

    assert stage_cache.adopt(other, entry, on_copied) == ["source/classes", "source/eval"]
    assert seen == [(["source/classes", "source/eval"], True, False)]
    assert (tmp_path / "b" / "source" / "target_bn" / "eval.json").read_text() == "[1]"
    assert other.finished("source/eval") and other.seconds("source/eval") == 0.0
    reopened = json.loads((tmp_path / "b" / "state.json").read_text())
    assert reopened["adopted"] == {"source/classes": str(entry), "source/eval": str(entry)}
    assert stage_cache.adopt(other, entry) == []  # finished here already: nothing copied again

    (entry / "source" / "target_bn" / "eval.json").write_text("[2]")  # a damaged copy: neither taken nor copied
    third = _state(tmp_path / "c", Config())
    assert stage_cache.adopt(third, entry) == ["source/classes"]
    assert not third.finished("source/eval") and not (tmp_path / "c" / "source" / "target_bn").exists()
    (entry / "source" / "classes.json").unlink()  # the first stage's file gone: nothing is taken
    assert stage_cache.adopt(_state(tmp_path / "d", Config()), entry) == []
    assert not (tmp_path / "d" / "source").exists()
    assert stage_cache.adopt(_state(tmp_path / "e", Config()), tmp_path / "cache" / "missing") == []


class SourceStagesDone(Exception):
    pass


@pytest.mark.ray
def test_the_source_stages_read_no_round_key(ray_session, small_benchmark, tmp_path, monkeypatch):
    """The source stages (label space, narrowing, evaluation with validators and the fused teacher's
    scores, target BN, its evaluation, the safeguard's prior rule and its verdict) of two runs whose
    configs differ in every ROUND_KEY give the same results."""
    publish = stage_cache.publish

    def publish_then_stop(state, prefix, entry):
        publish(state, prefix, entry)
        raise SourceStagesDone

    monkeypatch.setattr(stage_cache, "publish", publish_then_stop)
    # the default's config (a model with BatchNorm: the shipped source model) on the tests' small images
    base = [f"data.source.root={small_benchmark}", f"data.target.root={small_benchmark}", "data.source.size=[64, 36]",
            "data.target.size=[64, 32]", "lse.safeguard=true", "lse.safeguard_rule=prior", "lse.fused_teacher=true",
            "validation.images=4", "lse.online_teacher=0.9", "tracking.enabled=false"]
    default = flatten(config_to_dict(load_config(REPO / "configs" / "synthetic.yaml", base)))
    assert default["lse.target_bn"] and all(default[k] != v for k, v in CHANGED.items())
    entries = []
    for name, changed in (("a", {}), ("b", CHANGED)):
        loaded = load_config(REPO / "configs" / "synthetic.yaml", [*base, f"run_dir={tmp_path / name}"])
        cfg = with_values(loaded, changed)
        with pytest.raises(SourceStagesDone):
            rounds.run(cfg, RunState(RunStore(str(tmp_path / name)), cfg), Tracking(cfg, "adapt"),
                       shared_source=tmp_path / f"cache_{name}")
        (entry,) = (tmp_path / f"cache_{name}").iterdir()
        entries.append(entry)
    assert entries[0].name == entries[1].name  # the same key
    records = [json.loads((e / stage_cache.RECORDS).read_text()) for e in entries]
    assert list(records[0]) == list(records[1]) == [
        "source/classes", "source/narrow", "source/eval", "source/target_bn", "source/target_bn_eval",
        "source/target_scores", "source/target_bn_scores", "source/safeguard"]
    for stage in records[0]:
        assert records[0][stage]["outputs"].keys() == records[1][stage]["outputs"].keys(), stage
        for name in records[0][stage]["outputs"]:
            assert_same_content(entries[0] / name, entries[1] / name)


def assert_same_content(first: Path, second: Path) -> None:
    """The same results: the same bytes, but for the checkpoint an evaluation names (in its own run
    directory), the seconds the label space took to count, and the order of the scores' rows (as
    the actors returned them)."""
    if first.suffix == ".json":
        a, b = (json.loads(path.read_text()) for path in (first, second))
        for record in (a, b):
            record.pop("checkpoint", None), record.pop("seconds", None)
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True), first
    elif first.suffix == ".parquet":
        a, b = (pq.read_table(path).sort_by("index") for path in (first, second))
        assert a.equals(b), first
    else:
        assert first.read_bytes() == second.read_bytes(), first
