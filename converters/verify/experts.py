"""One mixture-of-experts layer's experts, each read once and shared by every consumer, a few at a time.

In a MoE layer every side of a verification (the HF model on the source, on the checkpoint mapped back, in
bfloat16; the MaxText reference in float32 and bfloat16) runs its own experts loop, and on the HF side each
prompt runs the layer on its own (as a whole-model forward does, so the numbers are bit for bit the same). They
all run at once, one thread per consumer, and ask the feed for the experts they need in ascending order. The
feed reads an expert when it is first asked for, hands the same bundle to everyone, and drops it once every
consumer has moved past it. At most `window` experts are held; only the consumer furthest behind may read past
that, so the slowest always makes progress and no consumer waits on another forever.

Consumers compute one at a time (`compute`, released while a consumer waits for or reads an expert): on a CPU
node two threads computing at once only fight over the cores, and reading the next expert overlaps computing.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np


class Bundle(dict):
    """What one expert's read produced (arrays by side), plus per-consumer derivatives made once (`derived`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._derived: dict = {}

    def derived(self, key, make: Callable[[], object]):
        with self._lock:
            if key not in self._derived:
                self._derived[key] = make()
            return self._derived[key]


class ExpertFeed:
    def __init__(self, load: Callable[[int], Bundle], window: int = 2):
        self._load = load
        self.window = window
        self._cv = threading.Condition()
        self._held: dict[int, Bundle] = {}
        self._loading: set[int] = set()
        self._pos: dict[int, int] = {}  # consumer -> the last expert it asked for (-1: none yet)
        self._local = threading.local()
        self.compute = threading.Lock()
        self.reads = 0  # experts read (each once)
        self.peak = 0  # most experts held at once

    def run(self, jobs: list[Callable[[], None]]) -> None:
        """Run each job as a consumer in its own thread; re-raise the first error after all have stopped."""
        errors: list[BaseException] = []
        with self._cv:
            self._pos = {c: -1 for c in range(len(jobs))}

        def consumer(c: int, job: Callable[[], None]) -> None:
            self._local.consumer = c
            try:
                with self.compute:
                    job()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                errors.append(e)
            finally:
                with self._cv:
                    self._pos.pop(c, None)
                    self._drop()
                    self._cv.notify_all()

        threads = [
            threading.Thread(target=consumer, args=(c, job), name=f"ckptflow-verify-{c}", daemon=True)
            for c, job in enumerate(jobs)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._held.clear()
        if errors:
            raise errors[0]

    def _drop(self) -> None:
        """Forget experts every remaining consumer has moved past (called with the condition held)."""
        low = min(self._pos.values(), default=np.inf)
        for e in [e for e in self._held if e < low]:
            del self._held[e]

    def get(self, e: int) -> Bundle:
        """Expert e's bundle, for the calling consumer (experts are asked for in ascending order)."""
        c = self._local.consumer
        self.compute.release()
        try:
            with self._cv:
                self._pos[c] = max(self._pos.get(c, -1), e)
                self._drop()
                self._cv.notify_all()
                while e not in self._held:
                    slowest = self._pos[c] <= min(self._pos.values())
                    if e not in self._loading and (len(self._held) + len(self._loading) < self.window or slowest):
                        self._loading.add(e)
                        break
                    self._cv.wait()
                else:
                    return self._held[e]
            try:
                bundle = self._load(e)  # I/O, without the lock: others compute or read meanwhile
            finally:
                with self._cv:
                    self._loading.discard(e)
                    self._cv.notify_all()
            with self._cv:
                self._held[e] = bundle
                self.reads += 1
                self.peak = max(self.peak, len(self._held))
                self._cv.notify_all()
                return bundle
        finally:
            self.compute.acquire()
