"""The Orbax checkpoint we write is MaxText's layout, restores with plain Orbax, and we read MaxText's own variants."""

from __future__ import annotations

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.core import registry
from converters.io.orbax import CheckpointReader, find_items_dir, read_params
from converters.io.safetensors import SafetensorsFolder
from converters.tiny_models import GENERIC_TEST_MODELS


def flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, prefix + (k,)))
        else:
            out["/".join(prefix + (k,))] = v
    return out


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("family", GENERIC_TEST_MODELS)
def test_restores_with_plain_orbax_in_maxtext_layout(tiny_model, tmp_path, family, scan):
    import ml_dtypes

    src = tiny_model(family, layers=3)
    hf_to_maxtext(src, tmp_path / "mt", scan=scan)
    items = tmp_path / "mt" / "0" / "items"
    restored = ocp.PyTreeCheckpointer().restore(items)
    assert set(restored) == {"step", "params", "opt_state"} and restored["step"] == 0 and restored["opt_state"] == {}
    assert set(restored["params"]) == {"params"}
    assert set(restored["params"]["params"]) == {"token_embedder", "decoder"}
    got = flat(restored["params"]["params"])
    cfg = json.loads((src / "config.json").read_text())
    want = {leaf.path: leaf.shape for leaf in registry.family_for_config(cfg).plan(cfg, scan)}
    assert {k: v.shape for k, v in got.items()} == want
    assert all(v.dtype == ml_dtypes.bfloat16 for v in got.values())
    prefix = "decoder/layers/" if scan else "decoder/layers_2/"
    assert any(k.startswith(prefix) for k in got)
    meta = json.loads((tmp_path / "mt" / "0" / "_CHECKPOINT_METADATA").read_text())
    assert meta["custom_metadata"] == {"scan_layers": scan}


def test_stacked_arrays_are_chunked_per_layer(tiny_model, tmp_path):
    """Layer-aligned chunks: each layer slice is written (and later read) without touching the others."""
    hf_to_maxtext(tiny_model("llama3.1", layers=3), tmp_path / "mt", scan=True)
    meta = ocp.PyTreeCheckpointer().metadata(tmp_path / "mt" / "0" / "items").item_metadata.tree
    q = meta["params"]["params"]["decoder"]["layers"]["self_attention"]["query"]["kernel"]
    assert q.shape == (64, 3, 4, 32) and q.storage.chunk_shape == (64, 1, 4, 32)


@pytest.mark.parametrize(
    "ocdbt,zarr3,compress", [(False, False, True), (True, False, True), (False, True, True), (True, True, False)]
)
def test_storage_switches(tiny_model, tmp_path, ocdbt, zarr3, compress):
    src = tiny_model("qwen3")
    hf_to_maxtext(src, tmp_path / "mt", use_ocdbt=ocdbt, use_zarr3=zarr3, compress=compress)
    meta = json.loads((tmp_path / "mt" / "0" / "items" / "_METADATA").read_text())
    assert meta["use_ocdbt"] is ocdbt and meta["use_zarr3"] is zarr3
    assert (tmp_path / "mt" / "0" / "items" / "manifest.ocdbt").exists() is ocdbt
    restored = ocp.PyTreeCheckpointer().restore(tmp_path / "mt" / "0" / "items")
    assert flat(restored["params"]["params"]).keys() == read_params(tmp_path / "mt").keys()
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf")
    a, b = SafetensorsFolder(src), SafetensorsFolder(tmp_path / "hf")
    assert all(np.array_equal(a.read(n), b.read(n)) for n in b.tensors)


def _save_tree(path, tree, step=7):
    """Write a tree the way a MaxText training run does: checkpoints/<step>/items with optimizer state."""
    mgr = ocp.CheckpointManager(
        path / "checkpoints",
        item_names=("items",),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
    )
    mgr.save(step, args=ocp.args.Composite(items=ocp.args.PyTreeSave(tree)))
    mgr.wait_until_finished()
    mgr.close()


def test_reads_training_checkpoint_with_optimizer_state_and_padded_vocab(tiny_model, tmp_path):
    src = tiny_model("llama3.1")
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    params = {}
    for k, v in read_params(tmp_path / "mt").items():
        node = params
        *parents, last = k.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    emb = params["token_embedder"]["embedding"]
    params["token_embedder"]["embedding"] = np.concatenate([emb, np.full((64, emb.shape[1]), 9.0, emb.dtype)])
    head = params["decoder"]["logits_dense"]["kernel"]
    params["decoder"]["logits_dense"]["kernel"] = np.concatenate(
        [head, np.full((head.shape[0], 64), 9.0, head.dtype)], 1
    )
    mu = {"mu": {"params": params}, "count": np.int32(5)}
    _save_tree(tmp_path / "run", {"step": 7, "params": {"params": params}, "opt_state": [mu, {}]})

    assert find_items_dir(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "7" / "items"
    maxtext_to_hf(tmp_path / "run", tmp_path / "hf", hf_config=str(src / "config.json"), dtype="float32")
    a, b = SafetensorsFolder(src), SafetensorsFolder(tmp_path / "hf")
    for n in a.tensors:
        expected = a.read(n).astype(np.float32)
        got = b.read(n)
        if n.endswith("q_proj.weight"):
            np.testing.assert_allclose(got, expected, rtol=1e-6)
        else:
            assert np.array_equal(got, expected), n


def test_reads_nnx_style_tree(tiny_model, tmp_path):
    """NNX checkpoints: no params/params root, integer layer indices and `value` leaves."""
    src = tiny_model("qwen3")
    hf_to_maxtext(src, tmp_path / "mt", scan=False, dtype="float32")
    tree: dict = {}
    for k, v in read_params(tmp_path / "mt").items():
        parts = k.split("/")
        if parts[1].startswith("layers_"):
            parts = [parts[0], "layers", parts[1].split("_")[1]] + parts[2:]
        node = tree
        for p in parts:
            node = node.setdefault(p, {})
        node["value"] = v
    _save_tree(tmp_path / "nnx", {"model": tree})
    r = CheckpointReader(tmp_path / "nnx")
    assert "decoder/layers_1/self_attention/query_norm/scale" in r.arrays
    maxtext_to_hf(tmp_path / "nnx", tmp_path / "hf", hf_config=str(src / "config.json"))
    a, b = SafetensorsFolder(src), SafetensorsFolder(tmp_path / "hf")
    assert all(np.array_equal(a.read(n), b.read(n)) for n in b.tensors)


def test_tensorstore_holds_a_referenced_block_until_its_commit():
    """The writer lets tensorstore keep blocks instead of copying them, and the buffer pool reuses a buffer once
    its reference count says nobody holds it: that is only safe while tensorstore holds a Python reference to
    the block until the transaction commits (true of tensorstore 0.1.x; this test is the tripwire)."""
    import sys

    import tensorstore as ts

    t = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "memory"}},
        dtype=ts.uint16,
        shape=[1024, 1024],
        chunk_layout=ts.ChunkLayout(write_chunk_shape=[512, 1024]),
        create=True,
    ).result()
    base = np.zeros(512 * 1024 + 8, np.uint16)
    alone = sys.getrefcount(base)
    block = base[8:].reshape(512, 1024)
    txn = ts.Transaction()
    t.with_transaction(txn)[0:512].write(block, can_reference_source_data_indefinitely=True).result()
    del block
    assert sys.getrefcount(base) > alone  # still referenced by the open transaction
    txn.commit_sync()
    assert sys.getrefcount(base) == alone


def test_one_transaction_at_a_time_commits_in_the_background():
    """Workers hand full transactions to `_BackgroundCommit`: a second one starts only when the first is done,
    whichever worker started it (that bound keeps the peak flat), and a failed commit reaches the worker waiting."""
    import asyncio

    from converters.io.orbax_handler import _BackgroundCommit

    async def run():
        loop = asyncio.get_running_loop()
        log, futures = [], []

        class Txn:
            def __init__(self, name):
                self.name = name

            def commit_async(self):
                log.append(f"start {self.name}")
                futures.append(loop.create_future())
                return futures[-1]

        gate = _BackgroundCommit()
        first = await gate.start(Txn("a"))
        waiting = asyncio.ensure_future(gate.start(Txn("b")))
        third = asyncio.ensure_future(gate.start(Txn("c")))
        await asyncio.sleep(0.01)
        assert log == ["start a"] and not waiting.done()
        first.set_result(None)
        await asyncio.sleep(0.01)
        assert log == ["start a", "start b"] and waiting.done() and not third.done()
        futures[1].set_exception(OSError("disk full"))
        with pytest.raises(OSError, match="disk full"):
            await third

    asyncio.run(run())


def test_concurrent_writes_keep_their_own_options(tmp_path):
    """Two `write_checkpoint` calls at once in one process, with different options: each call's handler has its own
    (worker count, progress counter, OCDBT process id, digest table), so neither sees the other's. The writers meet
    at a barrier in their first array's first piece: both calls have started before either starts its later arrays."""
    import threading

    from converters.io.orbax import LazyArray, WriteProgress, merge_shares, write_checkpoint
    from converters.io.orbax_handler import _hash_piece

    barrier = threading.Barrier(2, timeout=60)
    rng = np.random.default_rng(0)

    def arrays(tag: str, count: int = 3) -> dict:
        out = {}
        for k in range(count):
            data = rng.standard_normal((4, 8, 16)).astype(np.float32)

            def pieces(data=data, first=k == 0):
                for layer in range(data.shape[1]):
                    if first and layer == 0:
                        barrier.wait()
                    yield (slice(None), slice(layer, layer + 1), slice(None)), data[:, layer : layer + 1]

            out[f"{tag}_{k}"] = (data, LazyArray(data.shape, data.dtype, pieces, (4, 1, 16), name=f"{tag}_{k}"))
        return out

    runs = {
        "a": {"arrays": arrays("a"), "process_id": None, "workers": 1, "digests": {}, "progress": WriteProgress()},
        "b": {"arrays": arrays("b"), "process_id": 3, "workers": 2, "digests": {}, "progress": WriteProgress()},
    }
    errors: list = []

    def write(tag: str) -> None:
        run = runs[tag]
        try:
            write_checkpoint(
                tmp_path / tag,
                {"params": {"decoder": {n: a for n, (_, a) in run["arrays"].items()}}},
                scan_layers=True,
                workers=run["workers"],
                progress=run["progress"],
                process_id=run["process_id"],
                digests=run["digests"],
                txn_bytes=1024,
            )
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=write, args=(tag,)) for tag in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for tag, run in runs.items():
        items = tmp_path / tag / "0" / "items"
        # the arrays go to this writer's OCDBT sub-store (Orbax's own `step` scalar always goes to process 0's)
        stores = {p.name for p in items.glob("ocdbt.process_*")}
        assert stores == {"ocdbt.process_0"} | (
            {f"ocdbt.process_{run['process_id']}"} if run["process_id"] else set()
        ), tag
        assert set(run["digests"]) == set(run["arrays"]), tag
        assert run["progress"].done == sum(d.nbytes for d, _ in run["arrays"].values()), tag
        for name, (data, _) in run["arrays"].items():
            want = {(0, layer, 0): _hash_piece(data[:, layer : layer + 1])[1] for layer in range(data.shape[1])}
            assert run["digests"][name] == want, (tag, name)
        if run["process_id"] is not None:
            merge_shares(items)  # the root manifest over both sub-stores, as a split conversion's finalize does
        got = read_params(tmp_path / tag)
        assert got.keys() == {f"decoder/{name}" for name in run["arrays"]}, tag
        for name, (data, _) in run["arrays"].items():
            assert np.array_equal(got[f"decoder/{name}"], data), (tag, name)
