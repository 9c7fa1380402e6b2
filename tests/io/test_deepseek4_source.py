"""DeepSeek-V4 quantized sources decoded while reading (converters/io/quantized_fp8.py): FP8 e4m3 linears with UE8M0
`<m>.scale` 128x128 block scales, FP4 (E2M1, two per `I8` byte) routed experts with one UE8M0 scale per 32 inputs.

Checked against (a) hand-computed values, (b) an independent decode written here bit by bit from the format, (c)
transformers' own loader (DeepseekV4ForCausalLM.from_pretrained with FineGrainedFP8Config(dequantize=True)) on a tiny
V4 quantized by tests/io/deepseek4_quant.py, and (d) MaxText's standalone_scripts/deepseek_dequantize.py, whose output
for the deterministic stress folder below is recorded as SHA-256 digests (MAXTEXT_DIGESTS).
"""

from __future__ import annotations

import hashlib
import json
import struct

import ml_dtypes
import numpy as np
import pytest

from converters.errors import CorruptFileError, UnsupportedModelError
from converters.io.quantized import Fp8Folder, decoded_source
from converters.io.quantized_fp8 import CHUNK_ROWS, decode_fp4_groups, decode_fp8_blocks
from converters.io.safetensors import FP4X2, SafetensorsFile, SafetensorsFolder, save_file
from tests.io.deepseek4_quant import V4_QUANTIZATION, published_name, write_quantized_twin, write_tiny_plain_v4

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
V4_CFG = {"quantization_config": V4_QUANTIZATION, "expert_dtype": "fp4"}


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16)


# ---- an independent decode: every value from its bits, in Python floats --------------------------------------------
def e2m1(code: int) -> float:
    sign = -1.0 if code & 8 else 1.0
    exp, man = (code >> 1) & 3, code & 1
    return sign * (man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2))


def ref_fp4(packed: np.ndarray, scale_codes: np.ndarray) -> np.ndarray:
    u = packed.view(np.uint8)
    m, n = u.shape[0], 2 * u.shape[1]
    table = np.array([e2m1(c) for c in range(16)])
    values = np.empty((m, n))
    values[:, 0::2], values[:, 1::2] = table[u & 15], table[u >> 4]
    factor = np.array([2.0 ** (int(c) - 127) for c in scale_codes.view(np.uint8).ravel()]).reshape(scale_codes.shape)
    # float64 product of a 2-bit value and a power of two is exact; float32 and bfloat16 hold it (or overflow alike)
    with np.errstate(over="ignore"):  # 6 * 2^127 is inf
        return (values * np.repeat(factor, 32, axis=1)).astype(np.float32).astype(BF16)


def ref_fp8(w: np.ndarray, scale_codes: np.ndarray) -> np.ndarray:
    m, n = w.shape
    factor = np.array([2.0 ** (int(c) - 127) for c in scale_codes.view(np.uint8).ravel()]).reshape(scale_codes.shape)
    f32 = np.repeat(np.repeat(factor, 128, 0), 128, 1)[:m, :n].astype(np.float32)
    with np.errstate(over="ignore"):
        return (w.astype(np.float32) * f32).astype(BF16)  # one float32 product, rounded once to bfloat16


def test_fp4_nibble_order_values_and_scales():
    # byte 0x9A: low nibble 0xA = -1.0 (even input), high nibble 0x9 = -0.5 (odd input); scale 2^(128-127) = 2
    packed = np.zeros((2, 16), np.int8)
    packed[0, 0], packed[0, 1], packed[0, 15] = np.uint8(0x9A).view(np.int8), 0x70, 0x0F
    packed[1] = np.uint8(0x7F).view(np.int8)  # +6 (high), -6 (low)
    scale = np.array([[128], [0]], np.uint8).view(E8M0)
    got = decode_fp4_groups(packed, scale).astype(np.float32)
    want = np.zeros((2, 32), np.float32)
    want[0, 0], want[0, 1], want[0, 3], want[0, 30] = -2.0, -1.0, 12.0, -12.0
    want[1, 0::2], want[1, 1::2] = -6 * 2.0**-127, 6 * 2.0**-127  # float32 / bfloat16 subnormals, exact
    assert np.array_equal(got, want)
    codes = np.arange(16, dtype=np.uint8)
    every = np.tile(codes[0::2] | (codes[1::2] << 4), 2).reshape(1, 16).view(np.int8)
    assert np.array_equal(
        decode_fp4_groups(every, np.array([[127]], np.uint8).view(E8M0)).astype(np.float32)[0, :16],
        [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6],
    )
    assert bits(decode_fp4_groups(every, np.array([[127]], np.uint8).view(E8M0)))[0, 8] == 0x8000  # -0 stays -0
    huge = decode_fp4_groups(np.full((1, 16), 0x77, np.uint8).view(np.int8), np.array([[254]], np.uint8).view(E8M0))
    assert np.isinf(huge.astype(np.float32)).all()  # 6 * 2^127 overflows, as in float32
    # float scales (not V4's): the float32 product rounded to bfloat16
    f = decode_fp4_groups(np.full((1, 16), 0x33, np.uint8), np.array([[0.3]], np.float32)).astype(np.float32)
    assert f[0, 0] == np.float32(np.float32(1.5) * np.float32(0.3)).astype(BF16).astype(np.float32)
    with pytest.raises(CorruptFileError, match="groups of 32"):
        decode_fp4_groups(packed, scale[:1])
    with pytest.raises(CorruptFileError, match="0xFF"):
        decode_fp4_groups(packed, np.array([[255], [1]], np.uint8).view(E8M0))


def test_fp8_ue8m0_blocks_and_partial_edges():
    w = np.array([[1.0, -2.0, 448.0], [0.5, 0.0, -3.0], [1.5, 2.0, 4.0]], np.float32).astype(FP8)
    scale = np.array([[128, 125], [126, 130]], np.uint8).view(E8M0)  # x2, x1/4; x1/2, x8
    got = decode_fp8_blocks(w, scale, (2, 2)).astype(np.float32)
    assert np.array_equal(got, [[2.0, -4.0, 112.0], [1.0, 0.0, -0.75], [0.75, 1.0, 32.0]])
    assert np.array_equal(decode_fp8_blocks(w[2:], scale[1:], (2, 2), row0=2).astype(np.float32), got[2:])
    with pytest.raises(CorruptFileError, match="NaN"):
        decode_fp8_blocks(np.array([[0x7F]], np.uint8).view(FP8), scale, (2, 2))
    with pytest.raises(CorruptFileError, match="0xFF"):
        decode_fp8_blocks(w, np.full((2, 2), 255, np.uint8).view(E8M0), (2, 2))


def shake(seed: str, n: int) -> np.ndarray:
    """Deterministic bytes (independent of numpy's generators, so the MaxText digests below stay valid)."""
    return np.frombuffer(hashlib.shake_256(seed.encode()).digest(n), np.uint8).copy()


def stress_tensors() -> dict[str, np.ndarray]:
    """Every byte value of FP4 and FP8 (but NaN) under scales across the whole E8M0 range, partial 128-blocks."""

    def fp8(seed, shape):
        b = shake(seed, int(np.prod(shape))).reshape(shape)
        b[(b & 0x7F) == 0x7F] = 0x7E
        return b.view(FP8)

    def e8(seed, shape):
        return (shake(seed, int(np.prod(shape))) % 255).astype(np.uint8).reshape(shape).view(E8M0)

    return {
        "layers.0.attn.wq_a.weight": fp8("wq_a", (200, 136)),  # 2 x 2 blocks, both partial at the edges
        "layers.0.attn.wq_a.scale": e8("wq_a.s", (2, 2)),
        "layers.0.attn.wo_b.weight": fp8("wo_b", (256, 256)),
        "layers.0.attn.wo_b.scale": np.array([[0, 1], [254, 253]], np.uint8).view(E8M0),
        "layers.0.ffn.experts.0.w1.weight": shake("e0", 64 * 128).reshape(64, 128).view(np.int8),
        "layers.0.ffn.experts.0.w1.scale": e8("e0.s", (64, 8)),
        "layers.0.ffn.experts.1.w1.weight": shake("e1", 8 * 16).reshape(8, 16).view(np.int8),
        "layers.0.ffn.experts.1.w1.scale": np.array([[0], [1], [2], [126], [127], [128], [253], [254]], np.uint8).view(
            E8M0
        ),
        "layers.0.ffn.gate.weight": np.zeros((2, 8), BF16),
    }


# sha256 of MaxText 0.2.5's deepseek_dequantize.py output (bf16 bytes) for stress_tensors(): the script run on the
# folder test_matches_maxtext_dequantizer writes (with torch 2.13 / safetensors 0.8.0):
#   python .../maxtext/checkpoint_conversion/standalone_scripts/deepseek_dequantize.py --input-path <folder> \
#       --output-path <out>
MAXTEXT_DIGESTS = {
    "layers.0.attn.wo_b.weight": "28b49bcc26d55e10581558bcc02c7b87421781f73003454985d3d2c342866b84",
    "layers.0.attn.wq_a.weight": "6cb6df1e66b61229636f29542e6b43f0b507b498868e2371f67b8f0f8e89d32a",
    "layers.0.ffn.experts.0.w1.weight": "e4cfcb786621608902eec8f0f6e08ad8c262244efedcb43fd370d030773be80f",
    "layers.0.ffn.experts.1.w1.weight": "56c439ecd13fa84453805178fb1420a2c112d19933f5aa7f6f0de30908b89336",
}


def write_folder(path, tensors, cfg=V4_CFG):
    path.mkdir(parents=True, exist_ok=True)
    save_file(path / "model.safetensors", tensors)
    index = {"metadata": {}, "weight_map": {n: "model.safetensors" for n in tensors}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_matches_independent_decode_and_maxtext_dequantizer(tmp_path):
    t = stress_tensors()
    view = decoded_source(SafetensorsFolder(write_folder(tmp_path / "q", t)), V4_CFG)
    assert isinstance(view, Fp8Folder) and sorted(view.tensors) == sorted(n for n in t if not n.endswith(".scale"))
    for name in view.tensors:
        got = view.read(name)
        if name == "layers.0.ffn.gate.weight":
            continue
        scale = t[name[: -len(".weight")] + ".scale"]
        want = ref_fp4(t[name], scale) if t[name].dtype == np.int8 else ref_fp8(t[name], scale)
        assert got.dtype == BF16 and np.array_equal(bits(got), bits(want)), name
        assert hashlib.sha256(got.tobytes()).hexdigest() == MAXTEXT_DIGESTS[name], name


def test_aliased_names_read_their_scales(tmp_path):
    """A family's hf_aliases rename the folder's keys (converters/convert/hf_source.py with_aliases), not the tensors'
    own names: weights and scales are looked up by the keys."""
    t = stress_tensors()
    folder = SafetensorsFolder(write_folder(tmp_path / "q", {"model." + n: a for n, a in t.items()}))
    folder.tensors = {n[len("model.") :]: info for n, info in folder.tensors.items()}
    view = decoded_source(folder, V4_CFG)
    assert sorted(view.tensors) == sorted(n for n in t if not n.endswith(".scale"))
    name = "layers.0.ffn.experts.0.w1"
    want = ref_fp4(t[name + ".weight"], t[name + ".scale"])
    assert np.array_equal(bits(view.read(name + ".weight", slice(3, 9))), bits(want[3:9]))


def test_f4_storage_and_uint8_scales_decode_alike(tmp_path):
    t = stress_tensors()
    name = "layers.0.ffn.experts.0.w1"
    alt = {
        name + ".weight": t[name + ".weight"].view(np.uint8).view(FP4X2),  # safetensors "F4", torch float4_e2m1fn_x2
        name + ".scale": t[name + ".scale"].view(np.uint8),  # U8 codes
    }
    folder = write_folder(tmp_path / "f4", alt)
    head = SafetensorsFile(folder / "model.safetensors")
    assert head.tensors[name + ".weight"].shape == (64, 128)  # bytes; the header counts 256 values a row
    raw = (folder / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    assert header[name + ".weight"]["dtype"] == "F4" and header[name + ".weight"]["shape"] == [64, 256]
    a = decoded_source(SafetensorsFolder(folder), V4_CFG).read(name + ".weight")
    assert np.array_equal(bits(a), bits(ref_fp4(t[name + ".weight"], t[name + ".scale"])))


def test_torch_written_f8_e8m0_and_f4_read(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save

    packed = torch.from_numpy(shake("t", 32).reshape(2, 16).view(np.int8).copy())
    scale = torch.tensor([[130], [100]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    torch_save({"x.weight": packed.view(torch.float4_e2m1fn_x2), "x.scale": scale}, str(tmp_path / "model.safetensors"))
    f = SafetensorsFolder(tmp_path)
    assert f.info("x.weight").dtype == FP4X2 and f.info("x.scale").dtype == E8M0
    got = Fp8Folder(f, (128, 128)).read("x.weight")
    assert np.array_equal(bits(got), bits(ref_fp4(packed.numpy(), scale.view(torch.uint8).numpy())))


def test_unread_and_odd_packed_dtypes_are_refused(tmp_path):
    for tag, shape, err, why in (
        ("F6_E2M3", [4], UnsupportedModelError, "F6_E2M3, which ckptflow does not read"),
        ("F4", [3], CorruptFileError, "last axis must be even"),
    ):
        header = json.dumps({"a": {"dtype": tag, "shape": shape, "data_offsets": [0, 2]}}).encode()
        p = tmp_path / f"{tag}.safetensors"
        p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
        with pytest.raises(err, match=why):
            SafetensorsFile(p)


# ---- a tiny DeepSeek-V4 quantized as the published checkpoint -------------------------------------------------------
@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    """(plain tiny V4 with published names, its quantized twin, the dequantized twin)."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("v4")
    plain = write_tiny_plain_v4(root / "plain")
    write_quantized_twin(plain, root / "q", twin=root / "twin")
    return plain, root / "q", root / "twin"


def header_tags(folder) -> dict[str, str]:
    raw = (folder / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    return {n: e["dtype"] for n, e in header.items() if n != "__metadata__"}


def test_quantized_twin_has_the_published_layout(v4):
    _, q, _ = v4
    tags = header_tags(q)
    cfg = json.loads((q / "config.json").read_text())
    assert cfg["quantization_config"] == V4_QUANTIZATION and cfg["expert_dtype"] == "fp4"
    assert tags["layers.1.ffn.experts.3.w2.weight"] == "I8" and tags["layers.1.ffn.experts.3.w2.scale"] == "F8_E8M0"
    for m in (
        "attn.wq_a",
        "attn.wq_b",
        "attn.wkv",
        "attn.wo_a",
        "attn.wo_b",
        "attn.indexer.wq_b",
        "ffn.shared_experts.w2",
    ):
        assert tags[f"layers.1.{m}.weight"] == "F8_E4M3" and tags[f"layers.1.{m}.scale"] == "F8_E8M0", m
    for n in (
        "embed.weight",
        "head.weight",
        "layers.1.attn.compressor.wkv.weight",
        "layers.1.attn.indexer.weights_proj.weight",
        "layers.1.ffn.gate.weight",
    ):
        assert tags[n] == "BF16", n
    assert tags["layers.1.attn.attn_sink"] == tags["layers.1.ffn.gate.bias"] == tags["hc_head_fn"] == "F32"
    f = SafetensorsFolder(q)
    assert f.info("layers.1.ffn.experts.3.w2.weight").shape == (256, 64)  # [out, in/2]
    assert f.info("layers.1.ffn.experts.3.w2.scale").shape == (256, 4)  # [out, in/32]
    assert f.info("layers.1.attn.wo_b.scale").shape == (2, 2)
    assert sum(t == "I8" for t in tags.values()) == 3 * 4 * 3 and sum(t == "F8_E4M3" for t in tags.values()) == 25


def test_view_decodes_the_tiny_v4_to_its_twin(v4):
    plain, q, twin = v4
    view = decoded_source(SafetensorsFolder(q), json.loads((q / "config.json").read_text()))
    ref = SafetensorsFolder(twin)
    assert sorted(view.tensors) == sorted(ref.tensors) == sorted(SafetensorsFolder(plain).tensors)
    for name in ref.tensors:
        a, b = view.read(name), ref.read(name)
        assert (
            view.info(name).shape == a.shape
            and a.dtype == b.dtype
            and np.array_equal(a.view(np.uint8), b.view(np.uint8))
        ), name
    w = view.read("layers.2.ffn.experts.1.w3.weight")
    scales = SafetensorsFolder(q).read("layers.2.ffn.experts.1.w3.scale").view(np.uint8)
    assert len(np.unique(w.astype(np.float32))) > 10 and len(np.unique(scales)) >= 2  # codes and scales in play


def test_view_matches_transformers_dequantized_load(v4, monkeypatch):
    """transformers' own reader of the published layout (`.scale` -> weight_scale_inv, int8 FP4 experts, UE8M0)."""
    torch = pytest.importorskip("torch")
    import transformers.quantizers.quantizer_finegrained_fp8 as qf
    from transformers import DeepseekV4ForCausalLM, FineGrainedFP8Config

    _, q, _ = v4
    monkeypatch.setattr(qf.FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None)  # accelerate
    model, info = DeepseekV4ForCausalLM.from_pretrained(
        q, dtype=torch.bfloat16, quantization_config=FineGrainedFP8Config(dequantize=True), output_loading_info=True
    )
    assert not any(info.values()), info
    view = decoded_source(SafetensorsFolder(q), json.loads((q / "config.json").read_text()))
    for name, t in model.state_dict().items():
        got = t.float().numpy()
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            prefix = published_name(name.rsplit(".", 1)[0])
            parts = ["w1", "w3"] if name.endswith("gate_up_proj") else ["w2"]
            want = np.stack(
                [np.concatenate([view.read(f"{prefix}.{e}.{p}.weight") for p in parts]) for e in range(len(got))]
            )
        else:
            want = view.read(published_name(name))
        assert np.array_equal(got, want.astype(np.float32)), name


def test_dequantized_copy_with_the_original_config_reads_as_is(v4):
    """MaxText's deepseek_dequantize.py writes bf16 weights and leaves config.json alone: still expert_dtype fp4."""
    _, q, twin = v4
    folder = SafetensorsFolder(twin)
    view = decoded_source(folder, json.loads((q / "config.json").read_text()))
    assert isinstance(view, Fp8Folder) and view.tensors == folder.tensors


def test_one_expert_at_a_time(v4):
    """Reading an expert reads that expert's bytes and scale only (a row range: those rows only), never the stack."""
    _, q, _ = v4
    view = decoded_source(SafetensorsFolder(q), json.loads((q / "config.json").read_text()))
    reads = []
    inner_read = view.inner.read
    view.inner.read = lambda name, rows=None: reads.append((name, rows)) or inner_read(name, rows)
    whole = view.read("layers.1.ffn.experts.2.w2.weight")
    assert reads == [("layers.1.ffn.experts.2.w2.weight", None), ("layers.1.ffn.experts.2.w2.scale", None)]
    reads.clear()
    part = view.read("layers.1.ffn.experts.2.w2.weight", slice(40, 90))
    assert [r[0] for r in reads] == ["layers.1.ffn.experts.2.w2.weight", "layers.1.ffn.experts.2.w2.scale"]
    assert all(r[1] == slice(40, 90) for r in reads) and np.array_equal(bits(part), bits(whole[40:90]))
    reads.clear()
    attn = view.read("layers.1.attn.wo_b.weight", slice(130, 200))  # block row 1 only
    assert reads[1] == ("layers.1.attn.wo_b.scale", slice(1, 2))
    assert np.array_equal(bits(attn), bits(view.read("layers.1.attn.wo_b.weight")[130:200]))
    assert CHUNK_ROWS < 256  # decoded a chunk of rows at a time


# ---- refusals -------------------------------------------------------------------------------------------------------
def small_v4(path, **changes):
    t = stress_tensors()
    t.update(changes)
    return SafetensorsFolder(write_folder(path, {k: v for k, v in t.items() if v is not None}))


@pytest.mark.parametrize(
    "qc,top,why",
    [
        ({"scale_fmt": "ue4m3"}, {}, "scale_fmt 'ue4m3'"),
        ({"weight_block_size": [64, 64]}, {}, r"weight_block_size \[64, 64\] for DeepSeek-V4"),
        ({}, {"expert_dtype": "int4"}, "expert_dtype 'int4'"),
        ({"expert_dtype": "fp8"}, {}, "expert_dtype 'fp4' in the config but 'fp8'"),
        ({"fmt": "e5m2"}, {}, "fmt 'e5m2'"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, qc, top, why):
    folder = small_v4(tmp_path)
    with pytest.raises(UnsupportedModelError, match=why):
        decoded_source(folder, {**V4_CFG, **top, "quantization_config": {**V4_QUANTIZATION, **qc}})


@pytest.mark.parametrize(
    "changes,cfg,why",
    [
        ({"layers.0.attn.wq_a.scale": None}, {}, "wq_a.weight is float8_e4m3fn without"),
        ({"layers.0.attn.wq_a.scale": np.zeros((2, 1), np.uint8).view(E8M0)}, {}, r"\[200, 136\] does not match"),
        ({"layers.0.ffn.experts.0.w1.scale": np.zeros((64, 4), np.uint8).view(E8M0)}, {}, "FP4 groups of 32"),
        ({"layers.0.ffn.experts.0.w1.scale": np.zeros((64, 8), np.int32)}, {}, "not float or E8M0"),
        ({"layers.0.ffn.gate.scale": np.zeros((1, 1), np.uint8).view(E8M0)}, {}, "gate.weight is bfloat16 but has"),
        ({}, {"expert_dtype": "fp8"}, "experts.0.w1.weight is stored as fp4"),
        ({}, {"expert_dtype": "bf16"}, "stored as fp4"),
    ],
)
def test_broken_v4_layouts_are_refused(tmp_path, changes, cfg, why):
    folder = small_v4(tmp_path, **changes)
    with pytest.raises(CorruptFileError, match=why):
        decoded_source(folder, {**V4_CFG, **cfg})


def test_nan_scale_and_short_file_are_corrupt(tmp_path):
    bad = np.zeros((64, 8), np.uint8)
    bad[5, 3] = 0xFF
    view = decoded_source(small_v4(tmp_path / "nan", **{"layers.0.ffn.experts.0.w1.scale": bad.view(E8M0)}), V4_CFG)
    with pytest.raises(CorruptFileError, match="experts.0.w1.weight: an E8M0 block scale is 0xFF"):
        view.read("layers.0.ffn.experts.0.w1.weight")
    folder = small_v4(tmp_path / "short")
    view = decoded_source(folder, V4_CFG)
    last = max(folder.tensors.values(), key=lambda i: i.start + i.nbytes).name  # the file's last bytes
    last = last.replace(".scale", ".weight") if last not in view.tensors else last
    path = tmp_path / "short" / "model.safetensors"
    with open(path, "r+b") as f:  # cut inside the last tensor after the header was read
        f.truncate(path.stat().st_size - 3)
    with pytest.raises(CorruptFileError, match="unexpected end of file"):
        view.read(last)
    with pytest.raises(CorruptFileError, match="truncated"):
        SafetensorsFolder(tmp_path / "short")
