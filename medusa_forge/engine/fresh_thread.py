"""Run set-up work in a short-lived thread, so that a scheduler's loop thread is the only thread of
the process that keeps an OpenMP team.

Why: libgomp keeps a team of worker threads for every thread that ever started a parallel region,
for as long as that thread lives, and once it manages more threads than there are CPUs it cuts
each worker's spin before sleeping to a few hundred iterations, so every parallel region of every
team then pays a futex wake-up. On 2 cores, pycoder-26m, a one-slot decoding step run from a
scheduler's thread took 9.5 ms once the main thread had run a single OpenMP region, against 5.6 ms
when it had not (8 slots: 13.5 against 9.0 ms). A thread's team goes when the thread exits, so
loading an engine, warming it up and probing its cost model in a thread of their own leaves the
loop thread with the only team.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_fresh_thread(fn: Callable[[], T], name: str = "engine-setup") -> T:
    """``fn()`` run in a new thread that ends with it; its result returned, its exception raised here."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            error.append(e)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
