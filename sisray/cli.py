"""What every job entry point shares: config arguments, and bad input reported without a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from sisray.errors import Interrupted, SisrayError
from sisray.run_lock import release_all

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "synthetic.yaml"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="YAML config (default: the built-in synthetic benchmark, configs/synthetic.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set lse.scale=2.0 (repeatable)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's own logs (start-up, progress dumps, worker groups); "
                             "the same as SISRAY_VERBOSE=1")


INTERRUPTED = ("interrupted: the same command resumes the run after its last finished stage (a stage that was "
               "training goes on from its last checkpoint)")


def run(main: Callable[[], int | None]) -> None:
    """Run a job's main: bad input exits 2 with a one-line message, Ctrl-C exits 130; either way the
    run directory's lock is given back."""
    try:
        code = main()
    except SisrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(str(exc) or INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    finally:
        release_all()
    sys.exit(code or 0)


def add_run_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default=None, help="run directory (default: the config's run_dir)")


def job_config(args: argparse.Namespace):
    """The validated config of a job: file <- --set overrides <- --run-dir. Applies --verbose."""
    from sisray.cluster import VERBOSE_ENV
    from sisray.config import load_config

    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"

    overrides = list(args.overrides)
    if getattr(args, "run_dir", None):
        overrides.append(f"run_dir={args.run_dir}")
    return load_config(args.config, overrides)
