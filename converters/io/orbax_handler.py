"""The Orbax type handler that writes `LazyArray`s (`converters.io.orbax`) piece by piece.

Imported only when a checkpoint is written: it imports Orbax, tensorstore and JAX, which reading a checkpoint's
metadata or finding its folder does not need. Every `write_checkpoint` call makes its own handler holding that
call's `WriteOptions` and gives it to its own `PyTreeCheckpointHandler` through a type handler registry of its
own (`registry_for`): concurrent writes in one process never share options, and Orbax's global registry is left
as it is.

A `LazyArray` is used here by its attributes only (`shape`, `dtype`, `pieces`, `piece_shape`, `name`, `nbytes`),
so this module does not import `converters.io.orbax`, which imports it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import tensorstore as ts
from orbax.checkpoint import type_handlers
from orbax.checkpoint._src.futures import future
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from converters.outputs.hashing import array_bytes, content_hasher


def _origin(index: tuple, ndim: int) -> tuple[int, ...]:
    """Where a piece starts in its array (its chunk's origin: pieces are chunk-aligned)."""
    out = []
    for k in (tuple(index) + (slice(None),) * ndim)[:ndim]:
        out.append(k if isinstance(k, int) else (k.start or 0))
    return tuple(out)


def _hash_piece(block: np.ndarray) -> tuple[np.ndarray, str]:
    """The block in C order (copied only if it was a strided view) and the digest of its bytes as stored."""
    block = np.ascontiguousarray(block)
    return block, content_hasher(array_bytes(block)).hexdigest()


class _BackgroundCommit:
    """One transaction at a time committing in the background, shared by the workers of one write.

    A worker starts committing a full transaction and goes on producing its next piece meanwhile (the commit
    is mostly a wait for the disk); a worker with the next full transaction waits until the one in flight,
    whoever started it, is done. Memory is then one committing transaction on top of each worker's open one
    and its piece in the making. (One per worker was no faster and let the peak grow with the number of layers,
    as unbounded commits did: docs/performance.md, "Memory".) All workers run on one event loop, so this needs
    no lock.
    """

    def __init__(self):
        self.pending = None

    async def start(self, txn) -> object:
        while self.pending is not None:
            f = self.pending
            await f
            if self.pending is f:
                self.pending = None
        self.pending = txn.commit_async()
        return self.pending


@dataclass(frozen=True, eq=False)
class WriteOptions:
    """One write's settings: worker count, progress counter, OCDBT process id of this writer (None: Orbax's own),
    where the chunk digests computed while writing go ({array name: {chunk origin: blake3}}, None: not computed),
    and the data each worker buffers before committing it."""

    workers: int
    progress: object | None  # a `WriteProgress` (its `add(nbytes)`), or None
    process_id: int | None
    digests: dict | None
    txn_bytes: int


class LazyArrayHandler(type_handlers.NumpyHandler):
    """Orbax's numpy handler (its write spec, metadata and typestr, so the checkpoint restores as numpy leaves),
    writing each `LazyArray` region by region as its pieces are produced."""

    def __init__(self, options: WriteOptions):
        super().__init__(deepcopy_host_arrays=False)
        self.options = options

    async def serialize(self, values, infos, args=None):
        args = args or [type_handlers.SaveArgs()] * len(values)
        return [
            future.CommitFutureAwaitingContractedSignals(self._write_all(values, infos, args), name="ckptflow_lazy")
        ]

    async def _write_all(self, values: Sequence, infos, args):
        # Largest arrays first so the long tail is short; a small pool bounds how many pieces live at once.
        # (arrays with nothing to write here, e.g. other parts' share, are skipped: not even their metadata)
        workers = self.options.workers
        order = sorted((i for i in range(len(values)) if values[i].pieces is not None), key=lambda i: -values[i].nbytes)
        queue = list(order)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
        loop = asyncio.get_running_loop()

        async def worker():
            while queue:
                i = queue.pop(0)
                try:
                    await self._write_one(values[i], infos[i], args[i], pool, loop, background)
                except BaseException:
                    queue.clear()  # stop the other workers too: the checkpoint is abandoned
                    raise

        background = _BackgroundCommit()
        tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:  # one failed: stop the others before the checkpoint folder is removed
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            # wait for a piece still being produced so no thread calls back into a closed loop
            pool.shutdown(wait=True, cancel_futures=True)

    async def _write_one(self, value, info, arg, pool, loop, background: _BackgroundCommit):
        opts = self.options
        await info.await_path_creation()
        spec = ts_utils.build_array_write_spec(
            info=info,
            arg=arg,
            global_shape=value.shape,
            local_shape=value.piece_shape,
            dtype=np.dtype(value.dtype),
            use_ocdbt=info.is_ocdbt_checkpoint,
            process_index=ocdbt_utils.get_process_index_for_subdir(
                use_ocdbt=info.is_ocdbt_checkpoint,
                override_ocdbt_process_id=None if opts.process_id is None else str(opts.process_id),
            ),
        )
        t = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
        it = value.pieces()
        sentinel = object()
        progress = opts.progress
        chunk_sha = opts.digests.setdefault(value.name, {}) if opts.digests is not None else None

        def produce():
            # the next piece, and its digest, on a worker thread while the previous ones are written
            got = next(it, sentinel)
            if got is sentinel or chunk_sha is None:
                return got
            index, block = got
            block, sha = _hash_piece(block)
            chunk_sha[_origin(index, len(value.shape))] = sha
            return index, block

        # Pieces are grouped into transactions of about `txn_bytes`: an OCDBT store commits (rewrites
        # its manifest) once per transaction instead of once per piece, which is what small pieces (expert
        # slices) would otherwise spend their time on (docs/performance.md, "Speed"). Full transactions commit in the
        # background, one at a time (`_BackgroundCommit`);
        # an array's last one is committed before the worker moves on.
        txn, buffered, committing = None, 0, None
        try:
            while True:
                item = await loop.run_in_executor(pool, produce)
                if item is sentinel:
                    break
                index, block = item
                if block.shape != t[index].shape:
                    raise RuntimeError(f"{value.name}: piece {block.shape} does not fit {index} of {value.shape}")
                if txn is None:
                    txn = ts.Transaction()
                # tensorstore keeps a reference to the block until the commit instead of copying it (the
                # producers never modify a block they yielded; pooled buffers are reused only once released)
                await t.with_transaction(txn)[index].write(block, can_reference_source_data_indefinitely=True)
                buffered += block.nbytes
                if progress is not None:
                    progress.add(block.nbytes)
                item = block = None  # only the transaction holds it now: its buffer is free once committed
                if buffered >= opts.txn_bytes:
                    full, txn, buffered = txn, None, 0
                    committing = await background.start(full)
            if committing is not None:
                await committing
                committing = None
            if txn is not None:
                await txn.commit_async()
        except BaseException:
            if txn is not None and not txn.commit_started:
                txn.abort()
            if committing is not None:  # let it end before the caller removes the folder
                with contextlib.suppress(BaseException):
                    await committing
            raise


def registry_for(lazy_type: type, handler: LazyArrayHandler):
    """A type handler registry for one write: Orbax's standard handlers as currently registered, and `handler` for
    `lazy_type` (`LazyArray`), added last as `register_type_handler(..., override=True)` would add it."""
    standard = [(ty, type_handlers.get_type_handler(ty)) for ty in type_handlers.supported_types()]
    return type_handlers.create_type_handler_registry(*standard, (lazy_type, handler))
