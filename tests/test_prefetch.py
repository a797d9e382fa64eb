from __future__ import annotations

import random
import threading
import time

import pytest

from sisray.prefetch import prefetched


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_items_come_in_the_keys_order_whatever_the_load_times(depth):
    delays = random.Random(0)
    pauses = {k: delays.uniform(0, 0.01) for k in range(20)}

    def load(key):
        time.sleep(pauses[key])
        return key * key

    assert list(prefetched(load, range(20), depth)) == [k * k for k in range(20)]


def test_loads_run_ahead_on_other_threads_but_never_more_than_depth():
    started, caller = [], threading.get_ident()
    threads = set()

    def load(key):
        started.append(key)
        threads.add(threading.get_ident())
        return key

    items = prefetched(load, range(10), 2)
    assert next(items) == 0
    time.sleep(0.05)
    assert started == [0, 1, 2]  # 0 taken, 1 and 2 loading ahead, nothing further
    assert list(items) == list(range(1, 10)) and caller not in threads


def test_depth_zero_loads_on_the_callers_thread_when_asked():
    seen = []
    items = prefetched(lambda key: seen.append(threading.get_ident()) or key, range(3), 0)
    assert seen == [] and next(items) == 0 and seen == [threading.get_ident()]


def test_a_failed_load_raises_where_its_item_would_come():
    def load(key):
        if key == 3:
            raise OSError("truncated PNG")
        return key

    items = prefetched(load, range(6), 2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="truncated PNG"):
        next(items)
