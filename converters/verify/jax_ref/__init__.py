"""JAX reference forward pass of a MaxText checkpoint, one module per family.

A family is a `Family` subclass (see `common.py`) registered here under the HF `model_type`s it
serves. Adding a family means adding a module with its block and one `register_family` line; the
existing families are untouched.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from converters.errors import CkptflowError, UnsupportedModelError
from converters.verify.jax_ref.common import DTYPES, Family, ModelSpec, Params, hf_config_object

_REGISTRY: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    for model_type in family.model_types:
        if model_type in _REGISTRY and _REGISTRY[model_type] is not family:
            raise ValueError(f"model_type {model_type!r} already registered by {_REGISTRY[model_type].name}")
        _REGISTRY[model_type] = family
    return family


def get_family(model_type: str) -> Family:
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"no MaxText reference forward pass for model_type {model_type!r} "
            f"(supported: {', '.join(sorted(_REGISTRY))})"
        ) from None


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


# Built-in families.
from converters.verify.jax_ref.llama import LlamaFamily  # noqa: E402
from converters.verify.jax_ref.qwen import Qwen2Family, Qwen3Family  # noqa: E402
from converters.verify.jax_ref.gemma import Gemma2Family, Gemma3Family  # noqa: E402
from converters.verify.jax_ref.gpt_oss import GptOssFamily  # noqa: E402
from converters.verify.jax_ref.mixtral import MixtralFamily  # noqa: E402
from converters.verify.jax_ref.qwen3_moe import Qwen3MoeFamily  # noqa: E402
from converters.verify.jax_ref.deepseek import DeepSeekFamily  # noqa: E402
from converters.verify.jax_ref.qwen3_next import Qwen3NextFamily  # noqa: E402

register_family(LlamaFamily())
register_family(Qwen2Family())
register_family(Qwen3Family())
register_family(Gemma2Family())
register_family(Gemma3Family())
register_family(Qwen3MoeFamily())
register_family(MixtralFamily())
register_family(GptOssFamily())
register_family(DeepSeekFamily())
register_family(Qwen3NextFamily())


@functools.lru_cache(maxsize=None)
def _jitted(family: Family):
    """One compiled function per family and stage; recompiled only per prompt length / dtype."""
    import jax

    return (
        jax.jit(family.embed, static_argnums=0),
        jax.jit(family.block, static_argnums=0),
        jax.jit(family.output_head, static_argnums=0),
    )


class ReferenceModel:
    """What MaxText computes for a checkpoint, on one unbatched sequence.

    params: the checkpoint's arrays keyed by '/'-joined paths under `params/params`
    (`converters.orbax_io.read_params`); config: the HF config.json dict describing the model.
    """

    def __init__(self, params: Params, config: dict, *, dtype: str = "float32", bf16_tied_logits: bool = False):
        if dtype not in DTYPES:
            raise CkptflowError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
        cfg = hf_config_object(config)
        self.family = get_family(cfg.model_type)
        spec = dataclasses.replace(self.family.make_spec(cfg), dtype=dtype)
        # bf16_tied_logits: reproduce MaxText's bfloat16 cast of the tied embedding table in the
        # logits matmul also in float32 runs (see Family.output_head).
        self.spec: ModelSpec = spec.with_options(bf16_tied_logits=bool(bf16_tied_logits))
        self.warnings: list[str] = self.family.config_warnings(cfg)
        self.layout = self.family.detect_layout(self.spec, params)
        self.family.check_params(self.spec, params, self.layout)
        emb = params["token_embedder/embedding"]
        if emb.ndim != 2 or emb.shape[1] != self.spec.hidden_size or emb.shape[0] < self.spec.vocab_size:
            raise CkptflowError(
                f"token_embedder/embedding has shape {tuple(emb.shape)}; expected "
                f"[>= {self.spec.vocab_size}, {self.spec.hidden_size}] for this config"
            )
        self.vocab_size = int(emb.shape[0])  # may be padded beyond the HF vocabulary
        self._params = params
        self._prepared = None

    @property
    def scanned(self) -> bool:
        return self.layout.scanned

    def _prepare(self):
        """(globals, layers): globals as device arrays in the compute dtype; `layers` iterates each
        layer's arrays cast to the compute dtype as it goes.

        MaxText restores weights as float32 and casts each to `dtype` where it is used; casting a layer
        right before its block does the same while holding only one layer in the compute dtype (plus
        the checkpoint as stored), so a bf16 checkpoint needs about its own size in RAM.
        """
        if self._prepared is None:
            import jax.numpy as jnp

            dt = self.spec.jdtype
            globals_ = {k: jnp.asarray(np.asarray(self._params[k]), dtype=dt) for k in self.family.global_keys(self.spec)}
            stored = list(self.family.layer_params(self.spec, self._params, self.layout))
            self._prepared = (globals_, _LayersInComputeDtype(stored, dt))
            self._params = None
        return self._prepared

    def logits(self, token_ids) -> np.ndarray:
        """float32 logits `[T, V_checkpoint]` for the given ids (positions 0..T-1, one segment)."""
        import jax.numpy as jnp

        g, layers = self._prepare()
        ids = jnp.asarray(np.asarray(token_ids, dtype=np.int32))
        positions = jnp.arange(ids.shape[0], dtype=jnp.int32)
        embed, block, head = _jitted(self.family)
        x = embed(self.spec, g, ids)
        for p in layers:
            x = block(self.spec, p, x, positions)
        return np.asarray(head(self.spec, g, x), dtype=np.float32)


class _LayersInComputeDtype:
    """The stored layers (numpy, views into scanned stacks), each cast to the compute dtype on iteration."""

    def __init__(self, stored: list[dict], dtype):
        self._stored = stored
        self._dtype = dtype

    def __len__(self) -> int:
        return len(self._stored)

    def __iter__(self):
        import jax.numpy as jnp

        for layer in self._stored:
            yield {k: jnp.asarray(np.asarray(v), dtype=self._dtype) for k, v in layer.items()}


__all__ = [
    "Family",
    "ModelSpec",
    "ReferenceModel",
    "get_family",
    "register_family",
    "supported_model_types",
]
