"""Reading ahead: the next items of an iterator made in a background thread while the current one is used.

h5py reads, numpy copies and torch kernels release the GIL, so reading and converting the
next buffer of features overlaps training (or scoring) on the current one. Memory stays
bounded: at most ``depth`` finished items wait, plus the one being made and the one in use.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

__all__ = ["ahead"]

T = TypeVar("T")

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def ahead(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Yield the items of ``items``, made up to ``depth`` ahead of their use in a background thread.

    Parameters
    ----------
    items : iterable
        Consumed in the background thread only (a generator that reads a file is fine; it
        must not share non-thread-safe state with the consumer).
    depth : int
        Finished items that may wait (0: no thread, items are made on demand).

    Yields
    ------
    The items, in order. An exception raised while making an item is raised here, where
    that item would have been yielded. Closing the generator early (``break``, an error in
    the consumer) stops the thread before the next item and waits for it.
    """
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            put(_Failure(e))
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="featurecache-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()
