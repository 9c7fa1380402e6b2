import threading
import time

import pytest

from converters.io.read_ahead import read_ahead


def test_order_and_completion():
    assert list(read_ahead(range(100), depth=3)) == list(range(100))


def test_producer_runs_ahead_by_at_most_depth():
    produced = []

    def gen():
        for i in range(10):
            produced.append(i)
            yield i

    it = read_ahead(gen(), depth=2)
    assert next(it) == 0
    time.sleep(0.3)
    assert len(produced) <= 1 + 2 + 1  # consumed + queued + one blocked in put
    it.close()


def test_errors_reach_the_consumer():
    def gen():
        yield 1
        raise ValueError("bad block")

    with pytest.raises(ValueError, match="bad block"):
        list(read_ahead(gen()))


def test_early_close_stops_the_thread():
    it = read_ahead(iter(range(10**9)), depth=1)
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "ckptflow-read-ahead"]
