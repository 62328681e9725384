"""Reading ahead (featurecache.prefetch): order, errors where they belong, bounded work, a clean stop."""

from __future__ import annotations

import threading

import pytest

from featurecache.prefetch import ahead


def _threads() -> int:
    return sum(t.name == "featurecache-read-ahead" for t in threading.enumerate())


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_items_come_in_order(depth):
    assert list(ahead(iter(range(50)), depth)) == list(range(50))


def test_a_failure_is_raised_where_its_item_would_be():
    def items():
        yield 1
        yield 2
        raise ValueError("bad block 3")

    got = []
    with pytest.raises(ValueError, match="bad block 3"):
        for x in ahead(items(), 2):
            got.append(x)
    assert got == [1, 2] and _threads() == 0


def test_the_producer_runs_at_most_depth_items_ahead_and_stops_with_the_consumer():
    made = []
    gate = threading.Event()

    def items():
        for i in range(1000):
            made.append(i)
            yield i

    it = ahead(items(), 2)
    assert next(it) == 0
    gate.wait(0.3)  # let the producer run as far as it may
    # one in use, two waiting, one being handed over: never the whole iterable
    assert len(made) <= 4
    it.close()  # the consumer stops early: the thread ends, nothing more is made
    n = len(made)
    gate.wait(0.2)
    assert len(made) == n and _threads() == 0
