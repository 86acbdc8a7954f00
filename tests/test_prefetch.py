"""The batch prefetcher (llm2clip/data/prefetch.py) that runs stage 1's read + tokenise + pack ahead of the
step: same items in the same order as inline, errors surface at the right item, the work overlaps the
consumer, its CPU time is counted."""
import time

import pytest

from llm2clip.data.prefetch import Prefetcher


def _counter(n_fail: int | None = None, work_s: float = 0.0):
    state = {"i": 0}

    def produce():
        i = state["i"]
        state["i"] += 1
        if work_s:
            time.sleep(work_s)
        if n_fail is not None and i == n_fail:
            raise ValueError(f"bad sample in batch {i}")
        return i
    return produce, state


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_items_in_order_and_producer_stays_depth_ahead(depth):
    produce, state = _counter()
    p = Prefetcher(produce, depth)
    got = [next(p) for _ in range(20)]
    assert got == list(range(20))
    time.sleep(0.1)
    # the producer ran ahead by at most depth items (counted from the start of their production)
    assert 20 <= state["i"] <= 20 + depth
    p.close()


def test_error_surfaces_at_its_item_with_its_traceback():
    produce, _ = _counter(n_fail=3)
    p = Prefetcher(produce, 2)
    assert [next(p) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad sample in batch 3") as e:
        next(p)
    assert any(f.name == "produce" for f in e.traceback)  # raised where the producer failed
    with pytest.raises(StopIteration):  # the producer stopped there
        next(p)


def test_work_overlaps_the_consumer():
    """Producer and consumer each wait 40 ms per item: inline that is 80 ms per item, prefetched ~40 ms."""
    def run(depth: int) -> float:
        produce, _ = _counter(work_s=0.04)
        p = Prefetcher(produce, depth)
        t0 = time.perf_counter()
        for _ in range(12):
            next(p)
            time.sleep(0.04)  # the step
        p.close()
        return time.perf_counter() - t0
    inline, ahead = run(0), run(2)
    assert inline >= 12 * 0.08
    assert ahead < 0.75 * inline, (inline, ahead)


def test_cpu_time_of_the_producer_thread_is_counted():
    def produce():
        t = time.thread_time()
        while time.thread_time() - t < 0.02:  # 20 ms of CPU
            pass
        return 1
    p = Prefetcher(produce, 2)
    for _ in range(5):
        next(p)
    p.close()
    assert p.cpu_s >= 5 * 0.02 * 0.9
    inline = Prefetcher(produce, 0)
    next(inline)
    assert inline.cpu_s == 0.0  # inline work is part of the step, not counted as loader CPU
