"""How much memory `ckptflow verify` needs for a model, from its HF config alone (no weights read).

Verify streams (`converters.verify.engine`): all sides run the prompts ONE LAYER AT A TIME, each layer's
weights read from disk only while that layer runs and then released; a mixture-of-experts layer streams its
routed experts one at a time; the embedding and the LM head go in vocabulary row blocks, and each block's
logits update the comparisons and are dropped. Its peak therefore follows the model's LARGEST LAYER, not its
total size, and does not grow with depth, with the number of experts or with the vocabulary.

The estimate, in bytes (T = PROMPT_TOKENS):

    peak = BASE_BYTES + LAYER_COPIES x L x 4 + EXPERT_COPIES x X x 4 + GLOBAL_COPIES x G x 4 + B + A + V
           (+ BF16_COPIES x (L + G) x BF16_BYTES with `--dtype bfloat16`)

* a "layer" is one MaxText decoder layer: the leaves of the family's UNSCANNED plan grouped by their layer
  prefix (`decoder/layers_3`, `decoder/moe_layers_5`, `decoder/dense_layers_0`,
  `decoder/layers_remainder/layers_1`). Gemma2 keeps a (local, global) pair of HF layers in one, so there a
  layer is a pair;
* L: the largest layer's parameters without its routed experts (arrays whose rule has `experts` > 0);
* X: the largest layer's routed-expert parameters of ONE expert (one expert of every expert array of the
  layer), 0 for a dense model;
* G: the parameters of the arrays outside the layers that are read whole (norms, Gemma3's vision tower and
  projector), held for the whole run by both sides; the embedding and the LM head are row-streamed
  (`Leaf.row_streamed`) and count only as B = ROW_BLOCK_COPIES x ROW_BLOCK_BYTES;
* A: activations, T x (hidden + widest MLP + heads x T) x ACTIVATION_BYTES x ACTIVATION_STREAMS (the widest
  MLP a layer runs: the dense MLP, one expert's, a shared expert's, or DeepSeek's first dense layers'; heads x T
  is a layer's attention scores);
* V: one vocabulary block's logits on every side (T x rows, rows = ROW_BLOCK_BYTES / (4 x hidden)), as float32
  and as the float64 copies the block-wise KL works on: LOGIT_BYTES per value and side, 3 sides (5 with bfloat16);
* dtype: the float32 streams measure the conversion whatever `--dtype`, so the copies above are float32 in both
  cases; `--dtype bfloat16` ADDS two bfloat16 streams (hf_bf16, maxtext_bf16) with their own bfloat16 copy of the
  layer and of the globals. A bfloat16 verify needs more memory than a float32 one, not less.

Calibrated with `bench/verify_bench.py` against the measured peak RSS of the whole process (docs/performance.md,
"Verify", has the runs: Llama 3.1 8B dimensions at 2 to 32 layers and Qwen3-30B-A3B dimensions, float32 and
bfloat16). The estimate stays above every measurement; the DAG adds its own margin. `describe(cfg)` prints the terms of
one model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from converters.core.mapping import Leaf
from converters.core.registry import family_for_config
from converters.errors import CkptflowError

MiB = 1024**2
GiB = 1024**3

# Every copy of a weight the engine holds is float32 (`weights.F32`), whatever `--dtype`.
WEIGHT_BYTES = 4
# Interpreter, torch, JAX and transformers imported, the models built without weights, the tokenizer loaded, the
# buffer pool's free source buffers (docs/performance.md, "Verify"), with room for compiled functions and
# allocator slack.
BASE_BYTES = int(1.5 * GiB)
# One layer's weights: as the source folder holds it, as the checkpoint stores it, and the float32 copy the stream
# computing at that moment holds (an HF module or the reference; each lets go before the next loads).
LAYER_COPIES = 3
# One expert at a time, but two in flight (engine.EXPERT_WINDOW: one computed, the next read), each as the source
# holds it, as the checkpoint stores it, mapped back, and as each HF stream's module takes it (2 x ~6). The
# least certain constant: the benchmark will tell.
EXPERT_COPIES = 12
# Arrays read whole (norms, a vision tower): one copy per side, held from start to end.
GLOBAL_COPIES = 2
# With `--dtype bfloat16`: a bfloat16 copy of the layer and of the globals beside the others (the hf_bf16 and
# maxtext_bf16 streams load theirs one after the other; docs/performance.md, "Verify").
BF16_COPIES = 1
BF16_BYTES = 2
# Embedding / LM head rows are read in blocks of this size (engine.VOCAB_BLOCK_BYTES): the block from the source,
# from the checkpoint, and the logits it gives.
ROW_BLOCK_BYTES = 64 * MiB
ROW_BLOCK_COPIES = 3
# Tokens run through the models at once: the default prompts (three short ones and one of ~500 tokens).
PROMPT_TOKENS = 520
# Activations counted as float32 whatever `--dtype` (most streams are float32; bfloat16 ones are over-counted) ...
ACTIVATION_BYTES = 4
# ... once per stream the engine runs, each with its own activations: hf, hf_ckpt, maxtext, and with
# `--dtype bfloat16` also hf_bf16 and maxtext_bf16 (5 at most).
ACTIVATION_STREAMS = 5
# A vocabulary block's logits: float32 as computed, then float64 and its exponentials for the block-wise KL.
LOGIT_BYTES = 4 + 8 + 8
LOGIT_SIDES = {"float32": 3, "bfloat16": 5}  # hf, hf_ckpt, maxtext (+ hf_bf16, maxtext_bf16)

DTYPES = ("float32", "bfloat16")  # `ckptflow verify --dtype`

# `decoder/layers_3`, `decoder/moe_layers_5`, `decoder/dense_layers_0`; under `decoder/layers_remainder/` a
# layer is one level deeper.
_LAYER_DIR = re.compile(r"[a-z_]*layers_\d+")
_REMAINDER_DIR = re.compile(r"[a-z_]*layers_remainder")


@dataclass(frozen=True)
class Terms:
    """What the estimate is made of: parameter counts and widths, then each term in bytes."""

    layer_params: int  # L
    expert_params: int  # X
    global_params: int  # G
    row_streamed: bool  # the model has row-streamed arrays (embedding, LM head): B applies
    hidden: int
    mlp: int  # widest MLP a layer runs
    heads: int
    bf16: bool  # `--dtype bfloat16`: the two bfloat16 streams run too

    @property
    def layer_bytes(self) -> int:
        return self.layer_params * (LAYER_COPIES * WEIGHT_BYTES + self._bf16_bytes)

    @property
    def expert_bytes(self) -> int:
        return EXPERT_COPIES * self.expert_params * WEIGHT_BYTES

    @property
    def global_bytes(self) -> int:
        return self.global_params * (GLOBAL_COPIES * WEIGHT_BYTES + self._bf16_bytes)

    @property
    def _bf16_bytes(self) -> int:
        """Bytes per parameter the bfloat16 streams add to the layer and to the globals."""
        return BF16_COPIES * BF16_BYTES if self.bf16 else 0

    @property
    def row_block_bytes(self) -> int:
        return ROW_BLOCK_COPIES * ROW_BLOCK_BYTES if self.row_streamed else 0

    @property
    def activation_bytes(self) -> int:
        width = self.hidden + self.mlp + self.heads * PROMPT_TOKENS  # heads x T: the attention scores
        return PROMPT_TOKENS * width * ACTIVATION_BYTES * ACTIVATION_STREAMS

    @property
    def logit_bytes(self) -> int:
        rows = ROW_BLOCK_BYTES // (4 * self.hidden) if self.row_streamed else 0
        return PROMPT_TOKENS * rows * LOGIT_BYTES * LOGIT_SIDES["bfloat16" if self.bf16 else "float32"]

    @property
    def total_bytes(self) -> int:
        weights = self.layer_bytes + self.expert_bytes + self.global_bytes + self.row_block_bytes
        return BASE_BYTES + weights + self.activation_bytes + self.logit_bytes


def layer_of(path: str) -> str | None:
    """The MaxText decoder layer an (unscanned) array belongs to, e.g. `decoder/layers_3`; None outside layers."""
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "decoder":
        return None
    if _REMAINDER_DIR.fullmatch(parts[1]):
        return "/".join(parts[:3])
    return "/".join(parts[:2]) if _LAYER_DIR.fullmatch(parts[1]) else None


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise CkptflowError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")


def _layer_counts(leaves: list[Leaf]) -> tuple[int, int]:
    """(L, X): the largest layer's parameters without routed experts, and the largest layer's one-expert size."""
    dense: dict[str, int] = {}
    expert: dict[str, int] = {}
    for leaf in leaves:
        layer = layer_of(leaf.path)
        if layer is None:
            continue
        if leaf.rule.experts:  # routed experts are streamed: only one expert of each array counts
            expert[layer] = expert.get(layer, 0) + math.prod(leaf.rule.mt_shape)
        else:
            dense[layer] = dense.get(layer, 0) + math.prod(leaf.shape)
    return max(dense.values(), default=0), max(expert.values(), default=0)


def terms(cfg: dict, *, dtype: str = "float32") -> Terms:
    """The terms of the estimate for an HF config (`UnsupportedModelError` / `CkptflowError` for a bad one)."""
    _check_dtype(dtype)
    family = family_for_config(cfg)
    leaves = family.plan(cfg, scan=False)  # validates the config first
    d = family.dims(cfg)
    outside = [leaf for leaf in leaves if layer_of(leaf.path) is None]
    L, X = _layer_counts(leaves)
    # DeepSeek's first dense layers and its shared expert are wider than one routed expert (`Dims.mlp`).
    mlp = max(d.mlp, int(d.extra.get("dense_mlp") or 0), int(d.extra.get("shared_mlp") or 0))
    return Terms(
        layer_params=L,
        expert_params=X,
        global_params=sum(math.prod(leaf.shape) for leaf in outside if not leaf.row_streamed),
        row_streamed=any(leaf.row_streamed for leaf in outside),
        hidden=d.emb,
        mlp=mlp,
        heads=d.heads,
        bf16=dtype == "bfloat16",
    )


def verify_memory_bytes(cfg: dict, *, dtype: str = "float32") -> int:
    """Estimated peak memory of `ckptflow verify --dtype DTYPE` for the model of `cfg` (module docstring)."""
    return terms(cfg, dtype=dtype).total_bytes


def _size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def describe(cfg: dict, *, dtype: str = "float32") -> str:
    """One line: the estimate and its terms with their sizes (for `--help` texts and logs)."""
    t = terms(cfg, dtype=dtype)
    bf16 = f" + {BF16_COPIES} bf16" if t.bf16 else ""
    return (
        f"verify peak ~{_size(t.total_bytes)} ({dtype}) = base {_size(BASE_BYTES)}"
        f" + layer ({LAYER_COPIES} f32{bf16}) x {_count(t.layer_params)} {_size(t.layer_bytes)}"
        f" + experts {EXPERT_COPIES} f32 x {_count(t.expert_params)} {_size(t.expert_bytes)}"
        f" + globals ({GLOBAL_COPIES} f32{bf16}) x {_count(t.global_params)} {_size(t.global_bytes)}"
        f" + row blocks {ROW_BLOCK_COPIES} x {_size(ROW_BLOCK_BYTES)} {_size(t.row_block_bytes)}"
        f" + activations {PROMPT_TOKENS} tok x {ACTIVATION_STREAMS} streams {_size(t.activation_bytes)}"
        f" + logits block {_size(t.logit_bytes)}"
    )
