"""Verify streams: the same numbers as whole-model forwards, and one layer (one expert) in memory at a time.

* The HF side (transformers' own modules, one decoder layer at a time, experts fetched one by one) written out as
  golden logits equals `from_pretrained` + one forward, bit for bit, on every tiny family (eager attention and
  the eager experts loop, the reference implementations; the default `grouped_mm` differs by float rounding).
* Each stored array a run reads is released before the next layer's are read: every source tensor and every
  checkpoint array of layer i is garbage by the time anything of layer i + 1 is requested (the next layer is read
  while the mapped-back stream computes on its own copy), and a MoE layer holds at most `EXPERT_WINDOW` (+1 for
  the consumer furthest behind) experts at once.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from converters.convert import hf_to_maxtext
from converters.tiny_models import TINY, make_test_model
from converters.verify import make_golden, verify
from converters.verify.golden import GoldenFile

FAMILIES = sorted(TINY)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache: dict = {}

    def make(family: str, layers: int = 2):
        if (family, layers) not in cache:
            cache[family, layers] = make_test_model(family, tmp_path_factory.mktemp(family) / "hf", layers=layers)
        return cache[family, layers]

    return make


def _whole_model_logits(folder, prompts) -> list[np.ndarray]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = (
        {"experts_implementation": "eager"}
        if any(k in (folder / "config.json").read_text() for k in ("experts", "n_routed"))
        else {}
    )
    auto = AutoModelForCausalLM
    if type(AutoConfig.from_pretrained(folder)) not in auto._model_mapping:  # no causal-LM class (Qwen3-VL)
        from transformers import AutoModelForImageTextToText as auto
    model = auto.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager", **kwargs).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            extra = {k: torch.from_numpy(np.asarray(v)) for k, v in p.meta.get("inputs", {}).items()}
            out.append(model(torch.tensor([p.token_ids]), use_cache=False, **extra).logits[0].float().numpy())
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_hf_side_equals_a_whole_model_forward(family, tiny, tmp_path):
    folder = tiny(family)
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"tokens": [1, 5, 9, 2, 7, 300, 11, 4]}\n{"tokens": [3, 3, 8]}\n')
    golden = make_golden(hf=folder, out=tmp_path / "g.jsonl", prompts_file=ids)
    with GoldenFile(golden) as g:
        want = _whole_model_logits(folder, [r.prompt for r in g.records])
        for rec, w in zip(g.records, want):
            np.testing.assert_array_equal(rec.logits_block(0, rec.vocab_size), w)


def _track_reads(monkeypatch):
    """Record every array verify reads (source tensors, checkpoint arrays) with the step whose reads were last started,
    and check, each time a step's reads start, that nothing read for an earlier step is still alive."""
    from converters.io.orbax import PendingRead
    from converters.verify import engine
    from converters.verify.weights import SourceWeights

    reads: list[tuple[int, weakref.ref]] = []
    state = {"step": -1}

    def keep(a):
        reads.append((state["step"], weakref.ref(a)))
        return a

    def wrap(cls, name):
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, *a, **k: keep(original(self, *a, **k)))

    for name in ("read", "row", "rows"):
        wrap(SourceWeights, name)
    wrap(PendingRead, "result")

    prefetch = engine.Engine._prefetch

    def checked_prefetch(self, k):
        gc.collect()
        alive = [s for s, r in reads if r() is not None and 0 <= s < k]
        assert not alive, f"step {k}'s reads start while arrays read for steps {sorted(set(alive))} are alive"
        state["step"] = k
        return prefetch(self, k)

    monkeypatch.setattr(engine.Engine, "_prefetch", checked_prefetch)
    return reads


@pytest.mark.parametrize("family,scan", [("llama3.1", True), ("qwen3-moe", False), ("deepseek3", True)])
def test_one_layer_at_a_time(family, scan, tiny, tmp_path, monkeypatch):
    from converters.verify import experts

    hf = tiny(family, layers=4)
    ckpt = tmp_path / "mt"
    hf_to_maxtext(hf, ckpt, scan=scan)
    reads = _track_reads(monkeypatch)
    held = []
    run = experts.ExpertFeed.run

    def tracked_run(self, jobs):
        run(self, jobs)
        held.append(self.peak)

    monkeypatch.setattr(experts.ExpertFeed, "run", tracked_run)
    r = verify(maxtext=ckpt, hf=hf)
    assert r.passed, r.data["verdict"]
    assert {s for s, _ in reads} >= {0, 1, 2, 3}  # every step read what it needed while the check watched
    if family != "llama3.1":
        assert held and max(held) <= 3, held  # EXPERT_WINDOW (2) + the slowest consumer's one over
