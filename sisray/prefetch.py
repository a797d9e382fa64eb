"""Loading ahead: a training stage's batches decoded by threads while the model trains on the
current one, handed over in the stage's own seeded order (image decoding and resizing release the
GIL, so the threads run beside the training step)."""

from __future__ import annotations

from collections import deque
from itertools import islice
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

Key = TypeVar("Key")
Item = TypeVar("Item")


def prefetched(load: Callable[[Key], Item], keys: Iterable[Key], depth: int) -> Iterator[Item]:
    """load(key) for every key, in order, with up to `depth` loads running ahead on as many threads;
    depth 0 loads each on the caller's thread when it is asked for. An error is raised where its
    item would have been yielded."""
    if depth <= 0:
        yield from map(load, keys)
        return
    keys = iter(keys)
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="sisray-prefetch") as pool:
        pending = deque(pool.submit(load, key) for key in islice(keys, depth))
        try:
            while pending:
                item = pending.popleft().result()
                pending.extend(pool.submit(load, key) for key in islice(keys, 1))  # one new load for the one taken
                yield item
        finally:  # the consumer stopped early (an error, or a break): drop what was not started
            for future in pending:
                future.cancel()
