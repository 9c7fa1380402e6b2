"""Helpers shared by the MoE verification tests (import as `tests.verify.helpers`; conftest.py is not importable).

`converted_cache` is the body of a module-scoped `converted` fixture; `hf_float32` / `stack_layers` are the plain-numpy
pieces of each test's independent HF -> MaxText layout; `hf_logits` runs transformers in float32 and
`assert_reference_matches_transformers` compares the JAX reference with it; `save_tree` writes
a (deliberately damaged) restored Orbax tree beside a copy of the source checkpoint's sidecar;
`assert_fails_layout_only` is the check every deliberately wrong mapping must meet.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from converters.convert import hf_to_maxtext
from tests.families.helpers import hf_tensors

SHORT = '{"tokens": [1, 17, 301, 44]}\n{"tokens": [9, 2, 250, 3]}\n'  # two 4-token prompts


def converted_cache(hf_model, tmp_path_factory, family: str):
    """`make(scan)` -> the default-dtype tiny model converted to MaxText, built once per layout."""
    cache: dict = {}

    def make(scan: bool):
        if scan not in cache:
            out = tmp_path_factory.mktemp(f"{family}-{scan}") / "ckpt"
            hf_to_maxtext(hf_model(), out, scan=scan)
            cache[scan] = out
        return cache[scan]

    return make


def variants_cache(tmp_path_factory, layers: int):
    """Body of a module-scoped `converted` fixture over several test models: `make(test_model, scan=True)` ->
    (HF folder, bf16 checkpoint) of the `layers`-layer tiny model, built once each."""
    from converters.tiny_models import make_test_model

    cache: dict = {}

    def make(test_model: str, scan: bool = True):
        if (test_model, scan) not in cache:
            root = tmp_path_factory.mktemp(f"{test_model}-{scan}")
            hf = make_test_model(test_model, root / "hf", layers=layers)
            hf_to_maxtext(hf, root / "mt", scan=scan)
            cache[test_model, scan] = (hf, root / "mt")
        return cache[test_model, scan]

    return make


def hf_float32(folder: Path) -> tuple[dict, dict]:
    """(config.json, every HF tensor as float32)."""
    cfg = json.loads((folder / "config.json").read_text())
    return cfg, {n: t.astype(np.float32) for n, t in hf_tensors(folder).items()}


def embed_and_head(hf: dict) -> dict:
    return {
        "token_embedder/embedding": hf["model.embed_tokens.weight"],
        "decoder/decoder_norm/scale": hf["model.norm.weight"],
        "decoder/logits_dense/kernel": hf["lm_head.weight"].T,
    }


def stack_layers(layers: list[dict], scan: bool) -> dict:
    """Per-layer dicts -> `decoder/layers/...` stacked on axis 1 (scanned) or `decoder/layers_<i>/...`."""
    if scan:
        return {f"decoder/layers/{key}": np.stack([lay[key] for lay in layers], axis=1) for key in layers[0]}
    return {f"decoder/layers_{i}/{key}": v for i, lay in enumerate(layers) for key, v in lay.items()}


def hf_logits(folder: Path, ids: list[int], config=None) -> np.ndarray:
    """transformers' float32 logits of `folder` on `ids`; `config`: a transformers config object to build it with
    instead of the folder's own (Kimi-K2's kimi_k2 as DeepseekV3Config)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForCausalLM
    if type(config or AutoConfig.from_pretrained(folder)) not in auto._model_mapping:  # no causal-LM class (Qwen3-VL)
        auto = AutoModelForImageTextToText
    kwargs = {"config": config} if config is not None else {}
    model = auto.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager", **kwargs).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def assert_reference_matches_transformers(src: Path, params: dict, max_kl: float, hf_config=None):
    """The JAX reference on `params` (a numpy layout of float32 folder `src`) against transformers on 300 random
    tokens (built with `hf_config` when given, see `hf_logits`): HF logits are not flat and the per-token KL stays
    below `max_kl`. Returns the ReferenceModel."""
    from converters.verify.metrics import kl_per_token
    from converters.verify.reference import ReferenceModel

    ref = ReferenceModel(params, json.loads((src / "config.json").read_text()))
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 512, size=300)]
    hf = hf_logits(src, ids, hf_config)
    assert float(np.std(hf)) > 0.5
    assert kl_per_token(hf, ref.logits(ids)).max() < max_kl
    return ref


def restore_tree(src: Path) -> dict:
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer().restore((src / "0" / "items").absolute())


def save_tree(tree: dict, src: Path, dst: Path) -> Path:
    """Save `tree` (restored from `src`, then modified) as checkpoint `dst`, with a copy of `src`'s sidecar."""
    import orbax.checkpoint as ocp

    tree.pop("opt_state", None)  # empty; MaxText never reads it
    ocp.PyTreeCheckpointer().save((dst / "0" / "items").absolute(), tree)
    shutil.copytree(src / "ckptflow", dst / "ckptflow")
    return dst


def assert_fails_layout_only(mt: Path, hf: Path, tmp_path: Path, label: str = "") -> None:
    """verify of checkpoint `mt`, written with a wrong mapping that its own inverse undoes, on the two SHORT prompts:
    content passes with no failure (every tensor maps back exactly), layout fails by more than 100x its threshold,
    and so does the run."""
    from converters.verify import verify

    (tmp_path / "short.jsonl").write_text(SHORT)
    r = verify(maxtext=mt, hf=hf, prompts_file=tmp_path / "short.jsonl")
    v = r.data["verdict"]
    print(label, "layout KL", v["layout"]["kl_max"])
    assert v["content"]["passed"] and v["content"]["failed"] == 0, v["content"]["failures"]  # the inverse undid it
    assert not v["layout"]["passed"] and v["layout"]["kl_max"] > 100 * v["layout"]["max_kl"], v["layout"]
    assert not r.passed
