"""Rule builders shared by the mixture-of-experts families (router, stacked routed experts).

MaxText keeps routed experts stacked: `wi_0`/`wi_1` are `[E, emb, F]` and `wo` is `[E, F, emb]` per layer,
scanned `[E, L, ...]` (expert axis 0, layer axis 1). The engine builds those from per-expert HF tensors
(`experts.{e}.*` names) or from one fused tensor per layer, one (expert, layer) slice at a time.
"""

from __future__ import annotations

from converters.core.mapping import Dims, Rule, require
from converters.core.transforms import Chunks, Kernel
from converters.errors import UnsupportedModelError

# Tiny test models of the MoE families: top-2 routing, heads * head_dim != hidden.
TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_experts_per_tok": 2}

GLU = ("wi_0", "wi_1", "wo")  # MaxText names of gate, up and down projections


def experts(d: Dims) -> int:
    return d.extra["experts"]


def router(d: Dims, hf: str, mt: str, *, bias: bool = False) -> list[Rule]:
    """Router `[E, emb]` <-> `gate/kernel` `[emb, E]` (and its bias `[E]`)."""
    E, X = d.emb, experts(d)
    rules = [Rule(hf + ".weight", f"{mt}/kernel", hf_shape=(X, E), mt_shape=(E, X), chain=(Kernel((E, X)),))]
    if bias:
        rules.append(Rule(hf + ".bias", f"{mt}/bias", hf_shape=(X,), mt_shape=(X,)))
    return rules


def per_expert_glu(d: Dims, hf: str, mt: str, names: tuple[str, str, str]) -> list[Rule]:
    """One HF Linear per expert and projection (`hf` holds `{e}`; `names` are gate, up, down) <-> stacked arrays.

    gate/up `[F, emb]` -> `[E, emb, F]`; down `[emb, F]` -> `[E, F, emb]` (each expert transposed).
    """
    E, F, X = d.emb, d.mlp, experts(d)
    gate, up, down = names
    return [
        Rule(f"{hf}.{gate}.weight", f"{mt}/wi_0", hf_shape=(F, E), mt_shape=(E, F), chain=(Kernel((E, F)),), experts=X),
        Rule(f"{hf}.{up}.weight", f"{mt}/wi_1", hf_shape=(F, E), mt_shape=(E, F), chain=(Kernel((E, F)),), experts=X),
        Rule(f"{hf}.{down}.weight", f"{mt}/wo", hf_shape=(E, F), mt_shape=(F, E), chain=(Kernel((F, E)),), experts=X),
    ]


def fused_glu(d: Dims, hf: str, mt: str, mlp: int) -> list[Rule]:
    """transformers' fused experts `{hf}.gate_up_proj` `[X, 2F, emb]` (per expert: gate rows, then up rows) and
    `{hf}.down_proj` `[X, emb, F]` <-> stacked `wi_0` / `wi_1` `[X, emb, F]` and `wo` `[X, F, emb]`, read one expert
    row at a time (each expert transposed). `mlp` is the expert width F."""
    E, F, X = d.emb, mlp, experts(d)
    return [
        Rule(
            f"{hf}.gate_up_proj",
            (f"{mt}/wi_0", f"{mt}/wi_1"),
            hf_shape=(2 * F, E),
            mt_shape=(E, F),
            chain=(Kernel((E, F)),),
            experts=X,
            split=Chunks(2, axis=0),
        ),
        Rule(f"{hf}.down_proj", f"{mt}/wo", hf_shape=(E, F), mt_shape=(F, E), chain=(Kernel((F, E)),), experts=X),
    ]


def moe_dims(dims: Dims, cfg: dict, family: str, *, experts_key: str, mlp_key: str) -> Dims:
    """Add the MoE numbers to `dims`: routed experts, experts per token, expert MLP width.

    transformers >= 5 saves every family's expert count as `num_local_experts` (Qwen3-MoE's hub configs say
    `num_experts`); either is accepted.
    """
    dims.mlp = require(cfg, mlp_key, family)
    key = experts_key if cfg.get(experts_key) is not None else "num_local_experts"
    dims.extra["experts"] = require(cfg, key, family)
    dims.extra["top_k"] = require(cfg, "num_experts_per_tok", family)
    if dims.extra["experts"] < 2:
        raise UnsupportedModelError(
            f"a {family} model needs at least 2 experts, config has {key}={dims.extra['experts']}"
        )
    return dims
