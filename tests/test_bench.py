"""Benchmarks run in their tiny modes, so that a bench that breaks fails here (their figures are
read by people, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _last_json(script: str, *args: str, timeout: int = 300) -> dict:
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_masking_bench_compares_like_with_like():
    figures = _last_json("masking.py", "--tiny")
    assert figures["labels_agree"] == 1.0  # both sides compute the same labels
    assert figures["sisray_s"] > figures["floor_s"] > 0 and figures["threads"] == 2
