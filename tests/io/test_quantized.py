"""Quantized sources decoded while reading: MXFP4 (openai/gpt-oss-*) and FP8 block scales (deepseek-ai/DeepSeek-V3*).

The quantizer below is test code: it turns a tiny bf16 GPT-OSS into the official layout (`*_blocks` uint8
`[E, out, in/32, 16]`, low nibble = even element; `*_scales` uint8 E8M0 `[E, out, in/32]`;
`quantization_config.quant_method: mxfp4`) and, from the same grid values, writes the dequantized bf16 twin
(`gate_up_proj` `[E, emb, 2F]`, `down_proj` `[E, F, emb]`). Both must convert to identical MaxText arrays,
bit for bit, in both layouts. The decoder is also checked against transformers' own MXFP4 dequantization.
"""

from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest

from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.errors import CorruptFileError, UnsupportedModelError
from converters.io.orbax import read_params
from converters.io.quantized import Fp8Folder, Mxfp4Folder, decode_fp8_blocks, decode_mxfp4, decoded_source
from converters.io.safetensors import SafetensorsFolder, save_file
from converters.tiny_models import make_test_model

BF16 = np.dtype(ml_dtypes.bfloat16)
GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
EXPERT_KERNELS = ("gate_up_proj", "down_proj")


def quantize_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`[..., out, in]` float -> (blocks, scales, the dequantized values as float32), nearest grid value."""
    *lead, out_dim, in_dim = w.shape
    x = w.astype(np.float32).reshape(*lead, out_dim, in_dim // 32, 32)
    amax = np.abs(x).max(axis=-1)
    exp = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)), 0).astype(np.int32)
    exp = np.clip(exp, -127, 127)
    scaled = x / np.exp2(exp)[..., None]
    idx = np.abs(np.abs(scaled)[..., None] - GRID).argmin(axis=-1)  # nearest magnitude
    codes = (idx | np.where(scaled < 0, 8, 0)).astype(np.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    values = np.where(scaled < 0, -GRID[idx], GRID[idx]) * np.exp2(exp)[..., None]
    return blocks, (exp + 127).astype(np.uint8), values.reshape(w.shape)


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """(MXFP4 folder, dequantized bf16 twin) of a tiny 4-layer GPT-OSS."""
    root = tmp_path_factory.mktemp("mxfp4")
    base = make_test_model("gpt-oss", root / "base", layers=4)
    src = SafetensorsFolder(base)
    quantized, twin = {}, {}
    for name in src.tensors:
        t = src.read(name)
        if name.rsplit(".", 1)[-1] in EXPERT_KERNELS:
            # HF keeps [E, in, out]; MXFP4 quantizes rows of the [E, out, in] matrix along `in`
            t = t * 4  # wider range: more scales in play
            blocks, scales, values = quantize_mxfp4(np.swapaxes(t.astype(np.float32), 1, 2))
            quantized[name + "_blocks"], quantized[name + "_scales"] = blocks, scales
            twin[name] = np.ascontiguousarray(np.swapaxes(values, 1, 2)).astype(BF16)
        else:
            quantized[name] = twin[name] = t
    cfg = json.loads((base / "config.json").read_text())
    for folder, tensors, extra in (
        (
            root / "mxfp4",
            quantized,
            {
                "quantization_config": {
                    "quant_method": "mxfp4",
                    "modules_to_not_convert": [
                        "model.layers.*.self_attn",
                        "model.layers.*.mlp.router",
                        "model.embed_tokens",
                        "lm_head",
                    ],
                }
            },
        ),
        (root / "twin", twin, {}),
    ):
        folder.mkdir()
        save_file(folder / "model.safetensors", tensors)
        (folder / "config.json").write_text(json.dumps({**cfg, **extra}, indent=2))
    return root / "mxfp4", root / "twin"


def test_decode_table_nibble_order_and_scales():
    # byte 0x9A: low nibble 0xA = -1.0 (even element), high nibble 0x9 = -0.5 (odd element)
    blocks = np.zeros((1, 1, 16), np.uint8)
    blocks[0, 0, 0], blocks[0, 0, 1], blocks[0, 0, 15] = 0x9A, 0x70, 0x0F
    got = decode_mxfp4(blocks, np.array([[128]], np.uint8))  # scale 2^(128-127) = 2
    want = np.zeros(32, np.float32)
    want[0], want[1], want[3], want[30] = -2.0, -1.0, 12.0, -12.0
    assert np.array_equal(got[0], want)
    codes = np.arange(16, dtype=np.uint8)
    allcodes = np.broadcast_to((codes[0::2] | (codes[1::2] << 4))[None, None], (1, 2, 8)).reshape(1, 1, 16)
    assert np.array_equal(
        decode_mxfp4(allcodes, np.array([[127]], np.uint8))[0, :16],
        [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6],
    )
    assert decode_mxfp4(np.full((1, 1, 16), 0x77, np.uint8), np.array([[0]], np.uint8))[0, 0] == np.float32(
        6 * 2.0**-127
    )


def test_decoder_matches_transformers():
    import torch
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 10, 4, 16), dtype=np.uint8)
    scales = rng.integers(110, 140, (3, 10, 4), dtype=np.uint8)
    want = _convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32).numpy()
    assert np.array_equal(
        np.swapaxes(decode_mxfp4(blocks, scales), -1, -2), want
    )  # transformers also gives [E, in, out]


def test_folder_view_presents_decoded_tensors(twins):
    mx, twin = twins
    cfg = json.loads((mx / "config.json").read_text())
    view = decoded_source(SafetensorsFolder(mx), cfg)
    plain = SafetensorsFolder(twin)
    assert isinstance(view, Mxfp4Folder) and sorted(view.tensors) == sorted(plain.tensors)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert view.info(name).shape == (4, 64, 128) and view.info(name).dtype == BF16
    full = view.read(name)
    assert np.array_equal(full.view(np.uint16), plain.read(name).view(np.uint16))
    assert np.array_equal(view.read(name, slice(2, 3))[0].view(np.uint16), full[2].view(np.uint16))  # one expert row
    assert decoded_source(plain, json.loads((twin / "config.json").read_text())) is plain


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_mxfp4_source_converts_like_its_dequantized_twin(twins, tmp_path, scan):
    mx, twin = twins
    hf_to_maxtext(mx, tmp_path / "from_mxfp4", scan=scan)
    hf_to_maxtext(twin, tmp_path / "from_twin", scan=scan)
    a, b = read_params(tmp_path / "from_mxfp4"), read_params(tmp_path / "from_twin")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == BF16 and np.array_equal(a[k].view(np.uint16), b[k].view(np.uint16)), k
    if scan:  # exported: plain bf16 experts, no quantization_config, the twin's tensors exactly
        maxtext_to_hf(tmp_path / "from_mxfp4", tmp_path / "hf")
        cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
        assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
        out, ref = SafetensorsFolder(tmp_path / "hf"), SafetensorsFolder(twin)
        assert sorted(out.tensors) == sorted(ref.tensors)
        assert all(np.array_equal(out.read(n).view(np.uint16), ref.read(n).view(np.uint16)) for n in ref.tensors)


def test_broken_or_unknown_quantization(twins, tmp_path):
    mx, _ = twins
    broken = tmp_path / "broken"
    shutil.copytree(mx, broken)
    src = SafetensorsFolder(broken)
    tensors = {n: src.read(n) for n in src.tensors if n != "model.layers.0.mlp.experts.down_proj_scales"}
    save_file(broken / "model.safetensors", tensors)
    with pytest.raises(CorruptFileError, match="down_proj_scales"):
        hf_to_maxtext(broken, tmp_path / "out")
    cfg = json.loads((mx / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq"}
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="gptq"):
        hf_to_maxtext(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- FP8 block scales (deepseek-ai/DeepSeek-V3 / V3.2) ----------------------------------------------------------
# The quantizer is test code: every attention / MLP projection of a tiny bf16 DeepSeek-V3 becomes float8 e4m3 with a
# float32 `_scale_inv` per 16x16 block (the tiny tensors are smaller than the real 128x128 blocks; 16 leaves partial
# blocks at the edges, e.g. kv_a_proj_with_mqa [40, 64]); the bf16 twin holds bf16(fp32(fp8) * scale). Router,
# correction bias, norms, embedding and lm_head stay unquantized, as in the official repos.
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_BLOCK = [16, 16]
FP8_QUANTIZED = ("_proj.weight", "_proj_with_mqa.weight")


def quantize_fp8(w: np.ndarray, block=FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """`[M, N]` -> (float8 e4m3 weight, float32 `[ceil(M/b0), ceil(N/b1)]` scales), per-block amax mapped to 448."""
    m, n = w.shape
    gm, gn = -(-m // block[0]), -(-n // block[1])
    padded = np.zeros((gm * block[0], gn * block[1]), np.float32)
    padded[:m, :n] = w.astype(np.float32)
    amax = np.abs(padded.reshape(gm, block[0], gn, block[1])).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / 448.0, 1.0).astype(np.float32)
    q = (w.astype(np.float32) / np.repeat(np.repeat(scale, block[0], 0), block[1], 1)[:m, :n]).astype(FP8)
    return q, scale


@pytest.fixture(scope="module")
def fp8_twins(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    base = make_test_model("deepseek3", root / "base", layers=3)
    src = SafetensorsFolder(base)
    quantized, twin = {}, {}
    for name in src.tensors:
        t = src.read(name)
        if name.endswith(FP8_QUANTIZED):
            q, scale = quantize_fp8(t)
            quantized[name], quantized[name + "_scale_inv"] = q, scale
            twin[name] = (
                q.astype(np.float32) * np.repeat(np.repeat(scale, 16, 0), 16, 1)[: t.shape[0], : t.shape[1]]
            ).astype(BF16)
        else:
            quantized[name] = twin[name] = t
    cfg = json.loads((base / "config.json").read_text())
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": FP8_BLOCK}
    for folder, tensors, extra in ((root / "fp8", quantized, {"quantization_config": qc}), (root / "twin", twin, {})):
        folder.mkdir()
        save_file(folder / "model.safetensors", tensors)
        (folder / "config.json").write_text(json.dumps({**cfg, **extra}, indent=2))
    return root / "fp8", root / "twin"


def test_fp8_block_decode_rules():
    w = np.array([[1.0, -2.0, 448.0], [0.5, 0.0, -3.0], [1.5, 2.0, 4.0]], np.float32).astype(FP8)
    scale = np.array([[2.0, 0.25], [-1.0, 8.0]], np.float32)  # blocks of 2x2; last row / column are partial blocks
    got = decode_fp8_blocks(w, scale, (2, 2)).astype(np.float32)
    assert np.array_equal(got, [[2.0, -4.0, 112.0], [1.0, 0.0, -0.75], [-1.5, -2.0, 32.0]])
    assert np.array_equal(
        decode_fp8_blocks(w[2:], scale[1:], (2, 2), row0=2).astype(np.float32), got[2:]
    )  # a row range
    e8m0 = decode_fp8_blocks(w[:1, :1], np.array([[130]], np.uint8), (2, 2)).astype(np.float32)  # 2^(130-127)
    assert e8m0[0, 0] == 8.0
    with pytest.raises(CorruptFileError):
        decode_fp8_blocks(w, scale[:1], (2, 2))


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_fp8_source_converts_like_its_dequantized_twin(fp8_twins, tmp_path, scan):
    fp8, twin = fp8_twins
    view = decoded_source(SafetensorsFolder(fp8), json.loads((fp8 / "config.json").read_text()))
    assert isinstance(view, Fp8Folder) and sorted(view.tensors) == sorted(SafetensorsFolder(twin).tensors)
    assert SafetensorsFolder(fp8).info("model.layers.1.mlp.experts.3.down_proj.weight").dtype == FP8
    hf_to_maxtext(fp8, tmp_path / "from_fp8", scan=scan)
    hf_to_maxtext(twin, tmp_path / "from_twin", scan=scan)
    a, b = read_params(tmp_path / "from_fp8"), read_params(tmp_path / "from_twin")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), k
    if scan:  # exported: plain bf16 (bias float32), no quantization_config, exactly the twin's tensors
        maxtext_to_hf(tmp_path / "from_fp8", tmp_path / "hf")
        cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
        assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
        out, ref = SafetensorsFolder(tmp_path / "hf"), SafetensorsFolder(twin)
        assert sorted(out.tensors) == sorted(ref.tensors)
        assert all(
            out.info(n).dtype == ref.info(n).dtype
            and np.array_equal(out.read(n).view(np.uint8), ref.read(n).view(np.uint8))
            for n in ref.tensors
        )


def test_fp8_weight_without_scales_is_refused(fp8_twins, tmp_path):
    fp8, _ = fp8_twins
    broken = tmp_path / "broken"
    shutil.copytree(fp8, broken)
    src = SafetensorsFolder(broken)
    gone = "model.layers.2.self_attn.kv_b_proj.weight_scale_inv"
    save_file(broken / "model.safetensors", {n: src.read(n) for n in src.tensors if n != gone})
    with pytest.raises(CorruptFileError, match="kv_b_proj"):
        hf_to_maxtext(broken, tmp_path / "out")


# ---- compressed-tensors int4 pack-quantized (moonshotai/Kimi-K2-Thinking) ----
# The end-to-end twin test on a tiny Kimi is tests/families/test_kimi.py. The decoder was also checked against
# compressed-tensors 0.20.0's own pack_to_int32 / unpack_from_int32 / dequantize (outside the project venv):
# bit-identical on 29,376,256 elements, real expert shapes [2048, 7168] and [7168, 2048] included.
INT4_GROUP = {
    "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
    "input_activations": None,
}
INT4_QC = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": INT4_GROUP}}


def test_int4_word_layout_and_group_scales():
    from converters.io.quantized import decode_int4_groups

    # compressed-tensors packs [-8, -7, 0, 7, 1, 2, 3, 4] as 0xCBA9F810: element k in bits 4k..4k+3, stored + 8
    word = np.array([[np.uint32(0xCBA9F810).view(np.int32)]], np.int32)
    got = decode_int4_groups(word, np.ones((1, 1), BF16), 8, 32)
    np.testing.assert_array_equal(got.astype(np.float32), [[-8, -7, 0, 7, 1, 2, 3, 4]])
    # 64 inputs: codes 0..15 repeated, groups of 32 scaled by 0.5 and 3 (bf16 products rounded once)
    codes = np.tile(np.arange(16, dtype=np.uint32), 4).reshape(1, 8, 8)
    packed = (codes << (4 * np.arange(8, dtype=np.uint32))).sum(axis=-1, dtype=np.uint32).view(np.int32)
    scale = np.array([[0.5, 3]], BF16)
    want = (np.tile(np.arange(16) - 8, 4) * np.repeat([0.5, 3], 32)).astype(BF16)
    np.testing.assert_array_equal(decode_int4_groups(packed, scale, 64, 32), want[None])
    with pytest.raises(CorruptFileError, match="do not hold"):
        decode_int4_groups(packed, scale, 96, 32)


def test_int4_folder_rows_and_refusals(tmp_path):
    from converters.io.quantized import Int4Folder

    rng = np.random.default_rng(0)
    packed = rng.integers(-(2**31), 2**31, (6, 8), dtype=np.int64).astype(np.int32)
    scale = rng.random((6, 2)).astype(BF16)
    save_file(
        tmp_path / "model.safetensors",
        {"w.weight_packed": packed, "w.weight_scale": scale, "w.weight_shape": np.array([6, 64], np.int32)},
    )
    view = decoded_source(SafetensorsFolder(tmp_path), {"quantization_config": INT4_QC})
    assert (
        isinstance(view, Int4Folder) and list(view.tensors) == ["w.weight"] and view.info("w.weight").shape == (6, 64)
    )
    whole = view.read("w.weight")
    np.testing.assert_array_equal(view.read("w.weight", slice(2, 5)).view(np.uint16), whole[2:5].view(np.uint16))
    for bad, why in (
        ({"symmetric": False}, "symmetric=False"),
        ({"num_bits": 8}, "8-bit"),
        ({"strategy": "tensor"}, "strategy"),
        ({"actorder": "group"}, "activation ordering"),
    ):
        qc = {**INT4_QC, "config_groups": {"g": {**INT4_GROUP, "weights": {**INT4_GROUP["weights"], **bad}}}}
        with pytest.raises(UnsupportedModelError, match=why):
            decoded_source(SafetensorsFolder(tmp_path), {"quantization_config": qc})
    acts = {**INT4_QC, "config_groups": {"g": {**INT4_GROUP, "input_activations": {"num_bits": 8}}}}
    with pytest.raises(UnsupportedModelError, match="quantized activations"):
        decoded_source(SafetensorsFolder(tmp_path), {"quantization_config": acts})
    with pytest.raises(UnsupportedModelError, match="format 'float-quantized'"):
        decoded_source(SafetensorsFolder(tmp_path), {"quantization_config": {**INT4_QC, "format": "float-quantized"}})
    # a weight_shape the packing had to pad (in = 60: 8 words, 2 groups) is refused, not read with 4 extra columns
    save_file(
        tmp_path / "model.safetensors",
        {"w.weight_packed": packed, "w.weight_scale": scale, "w.weight_shape": np.array([6, 60], np.int32)},
    )
    with pytest.raises(UnsupportedModelError, match="padded"):
        decoded_source(SafetensorsFolder(tmp_path), {"quantization_config": INT4_QC}).read("w.weight")
