"""The start-up floor: what imports and Ray cost before any work, on this machine. Every Ray pass and
fit of a job pays part of it, whatever its size, so it bounds the whole-run ratios of
bench/scoring.py and bench/train_throughput.py and a round's fixed cost (bench/growth.py).

    python bench/startup.py [--reps 3] [--tiny]

- `import_torch_s`, `import_worker_s`: a fresh Python importing torch; importing what a Ray Train
  worker and a model actor import (sisray's training loop and timm, which brings torchvision and,
  through it, torch._dynamo);
- `ray_init_s`: sisray's start of a local Ray instance (`start_ray`), in this process;
- `actors_s`: two Ray actors of 1 CPU that import the worker's modules, from creation until both
  answer (median over reps; every rep starts new processes, as every pass does);
- `fit_s`, `fit_to_loop_s`, `fit_after_loop_s`: a Ray Train fit of 2 workers (gloo, as the CPU jobs
  run it) whose loop does nothing but report: the call to its return, the call to the first line of
  the loop, the loop's end to the return (medians over reps).

`--tiny` (one rep) is the test suite's smoke run. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO

sys.path.insert(0, str(REPO))

WORKER_IMPORTS = "import sisray.stages.train_loop, timm"


def fresh_import_s(statement: str) -> float:
    """Wall time of a fresh Python process that runs `statement` (its start included)."""
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - began


def actors_ready_s() -> float:
    """Two new actors that import the worker's modules, from creation until both answer."""
    import ray

    @ray.remote(num_cpus=1)
    class Importer:
        def __init__(self):
            exec(WORKER_IMPORTS)

        def ready(self) -> bool:
            return True

    began = time.perf_counter()
    actors = [Importer.remote() for _ in range(2)]
    ray.get([a.ready.remote() for a in actors])
    elapsed = time.perf_counter() - began
    for actor in actors:
        ray.kill(actor)
    return elapsed


def empty_loop(config: dict) -> None:
    """A training loop that records when it ran (rank 0) and reports once."""
    import logging

    import ray.train

    entered = time.time()
    logging.getLogger().setLevel(config["log_level"])  # Ray Train's per-report line logs past its logger
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["record"]).write_text(json.dumps({"entered": entered, "ended": time.time()}))
    ray.train.report({})


def empty_fit(storage: Path, log_level: str) -> tuple[float, float, float]:
    """(whole, call to loop, loop end to return) of a 2-worker fit of `empty_loop`, in seconds."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    storage.mkdir(parents=True, exist_ok=True)
    record = storage / "record.json"
    trainer = TorchTrainer(empty_loop, train_loop_config={"record": str(record), "log_level": log_level},
                           torch_config=TorchConfig(backend="gloo"),
                           scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           run_config=ray.train.RunConfig(name="empty", storage_path=str(storage),
                                                          logging_config=ray.train.LoggingConfig(log_level=log_level)))
    began = time.time()
    trainer.fit()
    returned = time.time()
    times = json.loads(record.read_text())
    return returned - began, times["entered"] - began, returned - times["ended"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="actor starts and fits measured (medians)")
    p.add_argument("--tiny", action="store_true", help="one rep (the tests' smoke run)")
    args = p.parse_args()
    reps = 1 if args.tiny else args.reps

    from sisray.cluster import ray_log_level, start_ray
    from sisray.stages.train import HEALTH_CHECK_ENV

    figures = {"import_torch_s": fresh_import_s("import torch"), "import_worker_s": fresh_import_s(WORKER_IMPORTS)}
    began = time.perf_counter()
    start_ray()
    figures["ray_init_s"] = time.perf_counter() - began
    figures["actors_s"] = statistics.median(actors_ready_s() for _ in range(reps))
    os.environ.setdefault(HEALTH_CHECK_ENV, "0.25")  # as the jobs' fits poll their workers
    with tempfile.TemporaryDirectory() as tmp:
        fits = [empty_fit(Path(tmp) / f"fit_{k}", ray_log_level()) for k in range(reps)]
    for key, values in zip(("fit_s", "fit_to_loop_s", "fit_after_loop_s"), zip(*fits)):
        figures[key] = statistics.median(values)
    figures = {k: round(v, 2) for k, v in figures.items()}
    print(f"imports in a fresh process: torch {figures['import_torch_s']} s, a worker's modules "
          f"{figures['import_worker_s']} s; Ray start {figures['ray_init_s']} s; two actors importing them "
          f"{figures['actors_s']} s; an empty 2-worker fit {figures['fit_s']} s ({figures['fit_to_loop_s']} s "
          f"before its loop, {figures['fit_after_loop_s']} s after it)")
    print(json.dumps({**figures, "reps": reps}))


if __name__ == "__main__":
    main()
