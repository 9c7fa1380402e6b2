"""Round trips in both directions for every family and layout, and the HF output loading in transformers.

Tolerances: every transform of these families only moves elements (transpose, reshape, RoPE
permutation), so round trips are bit-exact -- except Llama's query kernel, which MaxText stores scaled
by 1/sqrt(head_dim), not a power of two. That product is rounded once on the way in and once on the way
out, so the query may come back one unit in the last place (ulp) of the stored dtype away, never more.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.io.orbax import read_params
from converters.io.safetensors import SafetensorsFolder
from converters.tiny_models import GENERIC_TEST_MODELS

SCALED = {"llama3.1": ("q_proj.weight", "query/kernel")}  # tensors stored scaled by a non-power-of-two


def ulp_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Largest distance in representable steps between two same-dtype float arrays (same sign assumed)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    ints = {2: np.int16, 4: np.int32}[a.dtype.itemsize]
    ia, ib = a.view(ints).astype(np.int64), b.view(ints).astype(np.int64)
    return int(np.abs(ia - ib).max()) if a.size else 0


def assert_same_tensors(a: dict, b: dict, scaled_suffix: str | None):
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if scaled_suffix and name.endswith(scaled_suffix):
            assert ulp_distance(x, y) <= 1, name
        else:
            assert ulp_distance(x, y) == 0, f"{name} not bit-exact"


def hf_tensors(path) -> dict:
    f = SafetensorsFolder(path)
    return {n: f.read(n) for n in f.tensors}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("family", GENERIC_TEST_MODELS)
def test_hf_maxtext_hf_round_trip(tiny_model, tmp_path, family, scan, dtype):
    src = tiny_model(family, layers=3, dtype=dtype)
    hf_to_maxtext(src, tmp_path / "mt", scan=scan, dtype=dtype)
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype=dtype)
    scaled = SCALED.get(family, (None,))[0]
    original = {
        n: t
        for n, t in hf_tensors(src).items()
        if not (n == "lm_head.weight" and "lm_head.weight" not in hf_tensors(tmp_path / "hf"))
    }
    assert_same_tensors(original, hf_tensors(tmp_path / "hf"), scaled)
    # MaxText -> HF -> MaxText gives the same arrays back, in the same layout
    hf_to_maxtext(tmp_path / "hf", tmp_path / "mt2", scan=scan, dtype=dtype)
    scaled_mt = SCALED.get(family, (None, None))[1]
    assert_same_tensors(read_params(tmp_path / "mt"), read_params(tmp_path / "mt2"), scaled_mt)


@pytest.mark.parametrize("family", GENERIC_TEST_MODELS)
def test_tied_and_untied_variants(tiny_model, tmp_path, family):
    """Tied models have no logits_dense and write no lm_head; untied ones keep both."""
    for tied in (True, False):
        src = tiny_model(family, tied=tied)
        hf_to_maxtext(src, tmp_path / f"mt{tied}", scan=True)
        params = read_params(tmp_path / f"mt{tied}")
        assert ("decoder/logits_dense/kernel" in params) == (not tied)
        maxtext_to_hf(tmp_path / f"mt{tied}", tmp_path / f"hf{tied}")
        assert ("lm_head.weight" in SafetensorsFolder(tmp_path / f"hf{tied}").tensors) == (not tied)


@pytest.mark.parametrize("family", GENERIC_TEST_MODELS)
def test_exported_folder_loads_in_transformers_with_same_logits(tiny_model, tmp_path, family):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src = tiny_model(family, layers=2, dtype="float32")
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype="float32")

    want_cfg, got_cfg = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(tmp_path / "hf")
    assert type(got_cfg) is type(want_cfg)
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "tie_word_embeddings",
        "rope_parameters",
        "rms_norm_eps",
        "attention_bias",
    ):
        assert getattr(got_cfg, key, None) == getattr(want_cfg, key, None), key
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == want_cfg.architectures
    assert (tmp_path / "hf" / "generation_config.json").exists()

    ids = torch.tensor([[1, 5, 77, 300, 12, 499, 3, 8, 250, 100, 42, 7]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(ids).logits
    if family in SCALED:  # query within 1 float32 ulp: logits agree to float32 noise
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want)


def test_sharded_output_and_index(tiny_model, tmp_path):
    src = tiny_model("qwen3", layers=2)
    hf_to_maxtext(src, tmp_path / "mt", scan=False)
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", shard_bytes=40_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in SafetensorsFolder(tmp_path / "hf").tensors.values())
    assert hf_tensors(tmp_path / "hf").keys() == hf_tensors(src).keys()


def test_tokenizer_and_generation_config_travel_both_ways(tiny_model, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_model("qwen2.5"), src)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 77}')
    (src / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.7}')
    hf_to_maxtext(src, tmp_path / "mt")
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text()) == {"model_max_length": 77}
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["temperature"] == 0.7


def test_manifest_records_options_and_digests(tiny_model, tmp_path):
    from blake3 import blake3

    from converters.outputs.manifest import MANIFEST

    hf_to_maxtext(tiny_model("llama3.1"), tmp_path / "mt", scan=False, dtype="float32")
    m = json.loads((tmp_path / "mt" / MANIFEST).read_text())
    assert m["direction"] == "hf->maxtext" and m["family"] == "llama3.1"
    assert m["options"] == {
        "scan_layers": False,
        "dtype": "float32",
        "use_ocdbt": True,
        "use_zarr3": True,
        "compress": False,
    }
    some = next(k for k in m["outputs"] if k.startswith("0/items/"))
    assert m["outputs"][some]["blake3"] == blake3((tmp_path / "mt" / some).read_bytes()).hexdigest()


def test_large_pieces_round_trip_bit_exact_through_pool_and_direct_reads(tmp_path, monkeypatch):
    """Pieces of a few MB take the fast paths: read with O_DIRECT into pooled buffers, transposed into pooled
    buffers, kept by tensorstore without a copy until their (1 MB) transactions commit. Buffers are reused
    across pieces, and none is reused while a piece in it is still unwritten: the round trip is bit-exact."""
    from converters.core import registry
    from converters.io import buffers, direct_io
    from converters.tiny_models import write_synthetic_checkpoint

    cfg = registry.model("llama3.1-8b")[1]
    cfg.update(
        hidden_size=512,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=128,
        intermediate_size=2048,
        vocab_size=4096,
        num_hidden_layers=4,
    )
    src = write_synthetic_checkpoint(tmp_path / "src", cfg)
    direct = []
    real = direct_io._read_direct
    monkeypatch.setattr(direct_io, "_read_direct", lambda *a: direct.append(1) or real(*a))
    original = hf_tensors(src)
    for scan in (True, False):
        for f in src.glob("*.safetensors"):
            direct_io.evict(f)
        before = buffers.POOL.allocated
        hf_to_maxtext(src, tmp_path / f"mt{scan}", scan=scan, buffer_bytes=1 << 20)
        assert buffers.POOL.allocated - before < 12  # 24 pooled MLP pieces (read + transposed) on import alone
        assert buffers.POOL.spare_bytes == 0  # let go once the conversion is over
        maxtext_to_hf(tmp_path / f"mt{scan}", tmp_path / f"hf{scan}")
        assert_same_tensors(original, hf_tensors(tmp_path / f"hf{scan}"), SCALED["llama3.1"][0])
    if direct_io._O_DIRECT:
        assert direct
