"""Produce training batches in a background thread, a few ahead of the step.

Stage 1 reads caption pairs, tokenises and packs them on the host; run in the training thread, that host
work adds to every step (6% of the CPU step measured for tokenisation alone, issue 16). In a thread it
overlaps the step: torch kernels and the Rust tokenizer release the GIL. A thread rather than DataLoader
workers because the batches are small Python objects (no pixels), the stream's exact-resume state lives in
this process, and the producer must see the same objects as the trainer (no pickling of the stream).

The producer runs strictly in order, so batches and their order are those of the inline loop; each item
carries whatever the consumer needs to know about the stream *after* it (e.g. its resume state), because
the stream itself is already `depth` batches further on.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")

_POLL_S = 0.2  # how often a producer waiting for a free slot checks whether it was closed


class Prefetcher(Generic[T]):
    """Iterator over `produce()` results, computed up to `depth` items ahead of the consumer in a daemon
    thread: an item counts against `depth` from the moment its production starts until `next` hands it
    out, so depth 1 is "the next item is made while the current one is used" (the embed step's
    read-ahead) and depth 2 is stage 1's `data.prefetch` default.

    depth 0: `produce` runs in the caller's thread on each `next` (no thread; `cpu_s` stays 0 because the
    cost is already part of the step). An exception in `produce` is raised by the `next` that would have
    returned that item, with its original traceback; the thread stops there (so a StopIteration from
    `produce` ends the iteration).
    `cpu_s`: CPU seconds the producer thread has used so far (its own thread CPU time).
    """

    def __init__(self, produce: Callable[[], T], depth: int = 2, name: str = "prefetch"):
        self._produce, self.depth = produce, depth
        self.cpu_s = 0.0
        self._closed = threading.Event()
        if depth > 0:
            self._slots = threading.Semaphore(depth)
            self._q: queue.SimpleQueue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            if not self._slots.acquire(timeout=_POLL_S):
                continue  # `depth` items are ahead already: check for close, then wait again
            if self._closed.is_set():
                return
            t0 = time.thread_time()
            try:
                item, err = self._produce(), None
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                item, err = None, e
            self.cpu_s += time.thread_time() - t0
            self._q.put((item, err))
            if err is not None:
                return

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self.depth == 0:
            return self._produce()
        if self._closed.is_set():
            raise StopIteration
        item, err = self._q.get()
        self._slots.release()
        if err is not None:
            self._closed.set()
            raise err
        return item

    def close(self) -> None:
        """Stop the producer after its current item (it is a daemon thread: exiting without close is safe)."""
        self._closed.set()
