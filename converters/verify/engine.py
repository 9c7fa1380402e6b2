"""One verification run: every side streamed layer by layer, the comparisons accumulated block by block.

The sides ("streams") a run computes, each on every prompt:

    hf            transformers on the source folder's weights (the model the checkpoint was converted from)
    hf_ckpt       transformers on the checkpoint's values mapped back to HF (float32, no rounding)
    maxtext       the JAX reference of MaxText on the checkpoint as stored
    hf_bf16       transformers on the source, bfloat16 (with --dtype bfloat16)
    maxtext_bf16  the reference in bfloat16 (with --dtype bfloat16)
    golden        logits saved by `ckptflow golden` (verify --golden: instead of the HF streams)

Step k is stored (MaxText) layer k: it reads layer k's tensors once from each side (the source folder's, the
checkpoint's), compares them (content), runs every stream's layer k on every prompt, and lets go of what it read
before step k + 1's reads start (they overlap the last stream of step k, which computes on its own converted
copy). A mixture-of-experts layer reads its routed experts one at a time
(`converters.verify.experts`). The output projection is read in vocabulary blocks; each block's logits update
the comparisons (`converters.verify.metrics`) and are dropped.

What a step holds: the layer as stored on both sides, the HF module's weights of one stream in its dtype (or one
per HF stream in a MoE layer, whose experts stream), the reference's weights cast to its dtype, and the prompts'
activations. So memory follows the largest layer, not the model.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from converters.core import registry
from converters.errors import CkptflowError
from converters.io.malloc import fix_mmap_threshold
from converters.verify.content import ContentCheck
from converters.verify.experts import Bundle, ExpertFeed
from converters.verify.metrics import NonFinite, PairStats, StreamStats
from converters.verify.prompts import Prompt
from converters.verify.weights import CheckpointWeights, SourceWeights, TensorIndex, index_key

log = logging.getLogger("ckptflow.verify")

VOCAB_BLOCK_BYTES = 64 << 20  # one float32 block of the output projection's rows
EXPERT_WINDOW = 2  # experts of one layer held at once (one being computed, the next being read)


class Timer:
    """Wall seconds per activity (a run's `timing`)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, what: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[what] += time.perf_counter() - t

    def to_dict(self) -> dict:
        return {k: round(v, 3) for k, v in sorted(self.seconds.items())}


@dataclass
class Comparison:
    """Reference stream vs test stream, per prompt."""

    name: str
    ref: str
    test: str
    stats: list[PairStats] = field(default_factory=list)  # per prompt


class Engine:
    """Sets up the streams a run needs and runs them.

    source: the HF folder's weights (None with a golden file); ckpt: the checkpoint (None for `ckptflow golden`);
    golden: a `GoldenFile` whose records are the prompts' reference logits; golden_writer: collects the HF logits
    (`ckptflow golden`)."""

    def __init__(
        self,
        *,
        config: dict,
        prompts: list[Prompt],
        dtype: str,
        source: SourceWeights | None = None,
        ckpt: CheckpointWeights | None = None,
        golden=None,
        golden_writer=None,
    ):
        from converters.verify.hf_side import HFModel
        from converters.verify.reference import Reference

        fix_mmap_threshold()  # freed layer-sized buffers go back to the OS, not to the heap (see converters.io.malloc)
        self.prompts, self.dtype = prompts, dtype
        self.source, self.ckpt, self.golden, self.golden_writer = source, ckpt, golden, golden_writer
        self.timer = Timer()
        family = registry.family_for_config(config)
        if ckpt is not None:
            self.index = ckpt.index
        else:
            self.index = TensorIndex(family.plan(config, scan=False))
        unconverted = tuple(family.ignored(family.dims(config)))  # e.g. a vision tower the family does not convert
        # HF tensors stored as several that the rules read as one (Qwen3.5's in_proj_qkv + in_proj_z)
        fusions = tuple(family.hf_fusions(family.dims(config)))
        self.content = ContentCheck(ckpt.dtype.name) if source is not None and ckpt is not None else None
        self.nonfinite = NonFinite()  # NaN / Inf in the source's tensors, by name
        self.hf: dict[str, HFModel] = {}
        self.mt: dict[str, Reference] = {}
        if source is not None and ckpt is None:  # golden making: the HF model alone, in the requested dtype
            self.hf["hf"] = HFModel(config, dtype, unconverted, fusions)
        elif source is not None:
            self.hf["hf"] = HFModel(config, "float32", unconverted, fusions)
            self.hf["hf_ckpt"] = HFModel(ckpt.cfg, "float32", unconverted, fusions)
            if dtype == "bfloat16":
                self.hf["hf_bf16"] = HFModel(config, "bfloat16", unconverted, fusions)
        if ckpt is not None:
            for name, dt in (("maxtext", "float32"), ("maxtext_bf16", "bfloat16")):
                if dt == dtype or (name == "maxtext" and source is not None):
                    self.mt[name] = Reference(ckpt.cfg, ckpt.shapes, dtype=dt)
        self.head = self.index.by_path("decoder/logits_dense/kernel") or self.index.by_path("token_embedder/embedding")
        self.head_rows = self.index.tensors[self.head].leaf.rule.hf_shape[0]  # the HF vocabulary
        self.comparisons = self._comparisons()
        self.states: dict[str, list] = {}
        self.follows: list[
            bool
        ] = []  # per prompt: hf_ckpt's activations are hf's, bit for bit (shared, not recomputed)
        self.expert_reads = 0
        self._content_lock = threading.Lock()  # experts are checked on the feed's reading threads
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="ckptflow-verify-read")  # the source's next tensors

    def _comparisons(self) -> dict[str, Comparison]:
        mt = "maxtext_bf16" if self.dtype == "bfloat16" else "maxtext"
        pairs = {}
        if self.golden is not None:
            pairs["precision"] = ("golden", mt)
        elif self.ckpt is not None:
            pairs["precision"] = ("hf", mt)
            pairs["layout"] = ("hf_ckpt", "maxtext")
            pairs["format"] = ("hf", "hf_ckpt")
            if self.dtype == "bfloat16":
                pairs["hf_bf16"] = ("hf", "hf_bf16")
                pairs["bf16_compute"] = ("maxtext", "maxtext_bf16")
        streams = {s for pair in pairs.values() for s in pair}
        self.stream_stats = {
            s: [StreamStats(p.length) for p in self.prompts] for s in streams
        }  # one per side and prompt
        return {
            name: Comparison(
                name, ref, test, [PairStats(a, b) for a, b in zip(self.stream_stats[ref], self.stream_stats[test])]
            )
            for name, (ref, test) in pairs.items()
        }

    @property
    def reference(self):
        """A reference (the first MaxText stream), for what all of them share: layout, vocabulary, warnings."""
        return next(iter(self.mt.values()), None)

    # ---- run ------------------------------------------------------------------------------------------------
    def run(self) -> None:
        t = time.perf_counter()
        self._start()
        ref = self.reference
        self.steps = ref.num_layers if ref is not None else next(iter(self.hf.values())).num_layers
        self._next = self._prefetch(0)
        for k in range(self.steps):
            with self.timer("layers"):
                self._step(k)
            log.debug("step %d/%d done", k + 1, self.steps)
        with self.timer("head"):
            self._head()
        self._reader.shutdown()
        self.timer.seconds["total"] = time.perf_counter() - t

    def _source(self, name: str, rows: tuple[int, int] | None = None, expert: int | None = None) -> np.ndarray:
        """A source tensor (rows [start, stop) of it; one expert's row of a fused tensor), NaN / Inf counted."""
        if rows is not None:
            a = self.source.rows(name, *rows)
        elif expert is not None:
            a = self.source.row(name, expert)
        else:
            a = self.source.read(name)
        return self.nonfinite.scan(name, a, rows or expert)

    def _hf_weights(self, stream: str):
        """The tensor source of an HF stream: name -> array (source as stored; checkpoint mapped back, float32)."""
        if stream == "hf_ckpt":
            return lambda name: self.ckpt.back(name, runtime=True)
        return self._source

    def _start(self) -> None:
        """Globals (final norm, vision tower), then each prompt up to the first layer's input."""
        emb = self.index.by_path("token_embedder/embedding")
        # other tables looked up by token id, read by rows like the embedding (Gemma 4's per-layer embedding)
        tables = [n for n in self.index.row_streamed if n != emb and self.index.tensors[n].leaf.rule.row_axis == 0]
        for stream, model in self.hf.items():
            with self.timer(f"start_{stream}"):
                if stream == "hf_ckpt":
                    self._check_globals()
                read = self._hf_weights(stream)
                model.by_rows(tables)
                model.load({n: read(n) for n in self.index.globals})
                gather = (
                    (lambda name, ids: self.ckpt.back_gather(name, ids, runtime=True))
                    if stream == "hf_ckpt"
                    else self.source.gather
                )
                self.states[stream] = [
                    model.record(p.token_ids, functools.partial(gather, emb), p.meta.get("inputs"), gather)
                    for p in self.prompts
                ]
                model.release(model.model)
                if self.ckpt is not None:
                    self.ckpt.release()
        if "hf_ckpt" in self.states:
            self._update_follows()
        if self.mt:
            ref = self.reference
            with self.timer("start_maxtext"):
                g = {k: self.ckpt.read(k) for k in ref.global_keys}
                ids = [np.clip(np.asarray(p.token_ids, np.int64), 0, ref.vocab_size - 1) for p in self.prompts]
                uniq = np.unique(np.concatenate(ids))
                rows = self.ckpt.read_rows("token_embedder/embedding", uniq)
                vision = {k: v for k, v in g.items() if k not in ref.norm_keys}
                vision |= {k: self.ckpt.read_rows(k, uniq) for k in ref.row_keys}  # the prompts' rows of these
                for stream, r in self.mt.items():
                    self.states[stream] = [
                        r.prompt(rows, np.searchsorted(uniq, i), p.token_ids, vision, p.meta.get("inputs"))
                        for i, p in zip(ids, self.prompts)
                    ]
                self._norm = {k: g[k] for k in ref.norm_keys}
                self.ckpt.release()

    def _check_globals(self) -> None:
        for name in self.index.globals:
            self._compare(name, self.source.read(name), self.ckpt.back(name))  # (read and counted by "hf" already)

    def _compare(self, name: str, x: np.ndarray, back: np.ndarray) -> bool:
        """Content check of one tensor (or piece); True when hf_ckpt may use the source's values instead (identical
        as float32)."""
        t = self.index.tensors[name]
        return self.content.check(name, t.kind, x, back, t.leaf.rule.chain, self.ckpt.dtype)

    def _layers_of(self, k: int) -> tuple[tuple[int, ...], list[str]]:
        """(HF layers, their HF tensors, routed experts excluded) of stored layer k."""
        ref = self.reference
        layers = ref.hf_layers(k) if ref is not None else (k,)
        return layers, [n for l in layers for n in self.index.layers.get(l, ())]

    def _prefetch(self, k: int):
        """Start reading step k (once step k - 1 has let go of what it read): the checkpoint's arrays (tensorstore,
        in the background) and the source's tensors (a thread). Returns (k, the source's future, the stored reads)."""
        if k >= self.steps:
            return None
        layers, names = self._layers_of(k)
        stored = []
        if self.ckpt is not None:
            stored = [r for l in layers for r in self.ckpt.layer_reads(l)] + [
                at for r in self.mt.values() for at in r.layer_reads(k).values()
            ]
            self.ckpt.prefetch(stored)
        pending = self._reader.submit(lambda: {n: self._source(n) for n in names}) if self.source is not None else None
        return k, pending, stored

    def _step(self, k: int) -> None:
        """Stored layer k on every stream, its reads started before (`_prefetch`): the references compute while the
        source is read, then the source's streams, the content check, and the checkpoint's mapped-back stream while
        step k + 1 is read. Each side's weights are let go as soon as it is done with them."""
        (_, pending, stored), self._next = self._next, None
        layers, names = self._layers_of(k)
        moe = [l for l in layers if self.index.experts.get(l)]
        if moe and len(layers) != 1:
            raise CkptflowError("a stored layer holding several HF layers with experts is not supported")
        if not moe:
            self._references(k)
        with self.timer("read_source"):
            src = pending.result() if pending is not None else {}
            pending = None  # (a finished future keeps its result alive)
        if not moe:  # the source's streams, then its tensors go once compared with the checkpoint's
            for stream in self.hf:
                if stream != "hf_ckpt":
                    self._hf_layers(stream, layers, src)
        back, same = {}, True
        if "hf_ckpt" in self.hf:
            with self.timer("read_checkpoint"):
                back = {n: self.ckpt.back(n) for n in names}
            with self.timer("content"):
                same = all([self._compare(n, src[n], back[n]) for n in names])
        if moe:
            self._moe_step(k, layers[0], src, back)
        del src
        if self.ckpt is not None:
            self.ckpt.release(stored)  # mapped back: the stored arrays are no longer needed

        def next_step() -> None:  # step k + 1 is read while the mapped-back stream computes on its own copy
            self._next = self._prefetch(k + 1)

        if moe or "hf_ckpt" not in self.hf:
            back = None  # (for tensors the chain only views, these are the stored arrays themselves)
            next_step()
        elif same and all(self.follows):  # identical weights and inputs: identical outputs
            back = None
            for a, b in zip(self.states["hf"], self.states["hf_ckpt"]):
                b.follow(a)
            next_step()
        else:
            self._hf_layers("hf_ckpt", layers, back, consume=True, loaded=next_step)

    def _references(self, k: int) -> None:
        for stream, r in self.mt.items():
            with self.timer(stream):
                arrays = {rel: self.ckpt.read(*at) for rel, at in r.layer_reads(k).items()}
                r.layer(k, arrays, self.states[stream])
                del arrays
                gc.collect(1)  # JAX leaves the layer's device arrays in young reference cycles: up to a layer's worth

    def _hf_layers(
        self, stream: str, layers: tuple[int, ...], tensors: dict, consume: bool = False, loaded=None
    ) -> None:
        """The HF layers of one step on one stream. `consume`: `tensors` is emptied once loaded (the module holds
        its own copy in its dtype), so the step does not hold both; `loaded()` is called then."""
        model = self.hf[stream]
        with self.timer(stream):
            for l in layers:
                model.load({n: tensors[n] for n in self.index.layers.get(l, ())}, scope=model.layer_names[l])
            if consume:
                tensors.clear()
            if loaded is not None:
                loaded()
            for l in layers:
                for p in self.states[stream]:
                    model.layer(l, p)
            for l in layers:
                model.release(model.layers[l])
        if stream == "hf_ckpt":
            self._update_follows()

    def _update_follows(self) -> None:
        import torch

        self.follows = [bool(torch.equal(a.x, b.x)) for a, b in zip(self.states["hf"], self.states["hf_ckpt"])]

    def _moe_step(self, k: int, l: int, src: dict, back: dict) -> None:
        """A layer with routed experts: every stream and prompt at once, the experts read one at a time."""
        feed = ExpertFeed(lambda e: self._expert(k, l, e), window=EXPERT_WINDOW)
        first = self.index.experts[l][min(self.index.experts[l])]
        jobs = []
        for stream, model in self.hf.items():
            params = sorted({model.param_name(t.name)[0] for t, _ in first})

            def fetch(e: int, stream=stream, model=model) -> dict:
                bundle = feed.get(e)
                side = "back" if stream == "hf_ckpt" else "src"
                return bundle.derived(stream, lambda: model.expert_params(bundle[side]))

            model.install_experts(params, fetch)
            tensors = back if stream == "hf_ckpt" else src
            model.load({n: tensors[n] for n in self.index.layers.get(l, ())}, scope=model.layer_names[l])
            jobs += [lambda model=model, p=p: model.layer(l, p) for p in self.states[stream]]
        for stream, r in self.mt.items():
            arrays = {rel: self.ckpt.read(*at) for rel, at in r.layer_reads(k).items()}
            jobs.append(
                lambda r=r, arrays=arrays, stream=stream: r.layer(
                    k, arrays, self.states[stream], lambda e: feed.get(e)["mt"]
                )
            )
        try:
            with self.timer("moe_layers"):
                feed.run(jobs)
        finally:
            for model in self.hf.values():
                model.remove_experts()
                model.release(model.layers[l])
        self.expert_reads += feed.reads
        if "hf_ckpt" in self.hf:
            self._update_follows()

    def _expert(self, k: int, l: int, e: int) -> Bundle:
        """Expert e of HF layer l (stored layer k), read once: as the source holds it, as the checkpoint stores it
        (for the references) and mapped back (for hf_ckpt), with its content checked."""
        entries = self.index.experts[l][e]
        bundle = Bundle(src={}, back={}, mt={})
        with self.timer("read_experts"):
            if self.source is not None:
                bundle["src"] = {t.name: self._source(t.name, expert=None if p.row is None else e) for t, p in entries}
            if self.ckpt is not None:
                refs = {rel: at for r in self.mt.values() for rel, at in r.expert_reads(k, e).items()}
                arrays = self.ckpt.read_many([r for t, p in entries for r in t.reads(p)] + list(refs.values()))
                bundle["mt"] = {rel: arrays[(key, index_key(index))] for rel, (key, index) in refs.items()}
                if "hf_ckpt" in self.hf:
                    bundle["back"] = {t.name: self.ckpt.back_piece(t, p, arrays) for t, p in entries}
        if self.content is not None:
            with self._content_lock, self.timer("content"):
                for t, _ in entries:
                    self._compare(t.name, bundle["src"][t.name], bundle["back"][t.name])
        return bundle

    def _head(self) -> None:
        """Final norms, then the logits one vocabulary block at a time, and the row-streamed tensors' content."""
        from converters.verify.hf_side import to_torch

        for stream, model in self.hf.items():
            with self.timer(stream):
                read = self._hf_weights(stream)
                for scope in model.final_names:
                    model.load(
                        {n: read(n) for n in self.index.globals if model.param_name(n)[0].startswith(scope + ".")},
                        scope=scope,
                    )
                for p in self.states[stream]:
                    model.final(p)
                model.release(model.model)
        for stream, r in self.mt.items():
            with self.timer(stream):
                r.final(self._norm, self.states[stream])
        if self.ckpt is not None:
            self.ckpt.release()
        ref = self.reference
        head, hf_rows = self.head, self.head_rows
        sides = [hf_rows] if self.hf else []
        if ref is not None:
            sides.append(ref.vocab_size)
        if self.golden is not None:
            sides.append(min(r.vocab_size for r in self.golden.records))
        compared = min(sides)
        rows = hf_rows if self.hf else compared
        width = self.index.tensors[head].leaf.rule.hf_shape[1]
        block = max(256, VOCAB_BLOCK_BYTES // (4 * width) // 256 * 256)
        names = self.index.row_streamed if self.content is not None else [head] if self.source is not None else []
        blocks = [(v0, min(v0 + block, rows)) for v0 in range(0, rows, block)]
        ahead = self._head_reads(names, *blocks[0])
        for i, (v0, v1) in enumerate(blocks):
            pending, stored = ahead
            if i + 1 < len(blocks):  # the next block is read while this one is computed (one block ahead)
                ahead = self._head_reads(names, *blocks[i + 1])
            with self.timer("read_source"):
                src = pending.result()
            back = {}
            if self.content is not None:
                with self.timer("read_checkpoint"):
                    back = {name: self.ckpt.back_rows(name, v0, v1) for name in names}
                with self.timer("content"):
                    for name in names:
                        self._compare(name, src[name], back[name])
            c1 = min(v1, compared)
            if c1 > v0:
                self._logits(head, v0, c1, src.get(head), back.get(head), to_torch)
            if self.ckpt is not None:
                self.ckpt.release(stored + [(r.head_key, self.ckpt.rows_index(head, v0, c1)) for r in self.mt.values()])

    def _head_reads(self, names: list[str], v0: int, v1: int):
        """Start reading one vocabulary block on both sides: (future of the source's rows by name, stored reads)."""
        stored = [r for name in names for r in self.ckpt.rows_reads(name, v0, v1)] if self.content is not None else []
        if self.ckpt is not None:
            self.ckpt.prefetch(stored)
        return self._reader.submit(lambda: {name: self._source(name, (v0, v1)) for name in names}), stored

    def _logits(self, head: str, v0: int, v1: int, src_rows, back_rows, to_torch) -> None:
        """One vocabulary block of every stream's logits, into the comparisons (and the golden file)."""
        blocks: dict[str, list] = {}
        n = v1 - v0
        for stream, model in self.hf.items():
            with self.timer(stream):
                if stream == "hf_ckpt":  # the values that make transformers compute what MaxText computes
                    runtime = self.index.tensors[head].leaf.rule.runtime_chain is not None
                    w = to_torch(
                        self.ckpt.back_rows(head, v0, v1, runtime=True) if runtime else back_rows[:n], model.dtype
                    )
                else:
                    w = to_torch(src_rows[:n], model.dtype)
                blocks[stream] = [model.logits(p, w) for p in self.states[stream]]
        for stream, r in self.mt.items():
            with self.timer(stream):
                blocks[stream] = r.logits(
                    self.states[stream], self.ckpt.read(r.head_key, self.ckpt.rows_index(head, v0, v1))
                )
        if self.golden is not None:
            blocks["golden"] = [rec.logits_block(v0, v1) for rec in self.golden.records]
        with self.timer("compare"):
            for stream, stats in self.stream_stats.items():
                for s, b in zip(stats, blocks[stream]):
                    s.update(b, v0)
            for c in self.comparisons.values():
                for pair in c.stats:
                    pair.update()
            for stats in self.stream_stats.values():  # the block's float64 copies are not needed any more
                for s in stats:
                    s.block = s.weights = None
        if self.golden_writer is not None:
            for i, b in enumerate(blocks["hf"]):
                self.golden_writer.write_block(i, v0, b)
