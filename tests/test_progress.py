from __future__ import annotations

from sisray import progress as module
from sisray.progress import Progress, duration


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (0.4, 42, 185, 3725)] == ["0 s", "42 s", "3 min 05 s", "1 h 02 min"]


def test_a_line_per_tenth_with_the_rate_since_the_start_and_the_time_left(capsys, monkeypatch):
    clock = iter(float(t) for t in range(100))  # one second per call: the constructor's, then one per line
    monkeypatch.setattr(module.time, "perf_counter", lambda: next(clock))
    steps = Progress("round_01 training", 40, "steps", start=20)  # resumed at step 20 of 40
    for _ in range(20):
        steps.advance(1, "loss 0.500")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5  # steps 24, 28, 32, 36 and 40
    assert lines[0] == "round_01 training: 24/40 steps (4.0 steps/s, loss 0.500), 4 s left"
    assert lines[-1] == "round_01 training: 40/40 steps (4.0 steps/s, loss 0.500)"  # done: no time left
