"""Quantized HF sources, decoded while reading (HF -> MaxText only; MaxText checkpoints and exports are bf16/fp32).

`decoded_source(folder, cfg)` wraps a `SafetensorsFolder` so that a quantized checkpoint presents the plain
tensors the family mappings expect: the conversion never sees the quantized storage, and every tensor is
decoded on its own (or one expert row at a time), so no more than one decoded tensor piece is in memory.

MXFP4 (`quantization_config.quant_method == "mxfp4"`, the official openai/gpt-oss-* repos): a weight `W`
`[..., out, in]` is stored as
  * `W_blocks`: uint8 `[..., out, in/32, 16]`, 32 FP4 (E2M1) values per block, two per byte, the low
    nibble holding the even element and the high nibble the odd one;
  * `W_scales`: uint8 `[..., out, in/32]`, one E8M0 exponent per block: the block's values are multiplied
    by 2^(scale - 127).
E2M1 is sign bit 3, exponent bits 2-1, mantissa bit 0: magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}. The decoded
tensor is presented under the name without `_blocks`, with its last two axes swapped (`[..., in, out]`:
GPT-OSS's `gate_up_proj` `[E, emb, 2F]` and `down_proj` `[E, F, emb]`, the layout of the BF16 repos), in
bfloat16 -- every decoded value is exactly representable there (2 significant bits times a power of two).

FP8 block scales (`quant_method == "fp8"`, the official deepseek-ai/DeepSeek-V3 / V3.2 repos, and DeepSeek-V4-Flash /
-Pro with their FP4 routed experts, `.scale` names and E8M0 scales): converters/io/quantized_fp8.py. A weight `W` is
float8 e4m3 with one factor per `weight_block_size` (128 x 128) block; the decoded tensor is `bf16(fp32(W) * scale)`
under the name `W`, the scale tensor hidden; unquantized tensors (embeddings, norms, router, correction bias) pass
through unchanged.

compressed-tensors int4 "pack-quantized" (`quant_method == "compressed-tensors"`, `format == "pack-quantized"`: the
official moonshotai/Kimi-K2-Thinking repo, whose routed experts are int4 and everything else bf16): a linear weight
`W` `[out, in]` is stored as
  * `W_packed`: int32 `[out, ceil(in/8)]`, eight 4-bit codes per word along `in`, element k of a word in bits
    4k..4k+3 (the first element in the low nibble; dense, little-endian words); a code c is the signed value c - 8;
  * `W_scale`: bf16/fp16/fp32 `[out, ceil(in/g)]`, one factor per group of g (`group_size`, 32 in Kimi) consecutive
    inputs of a row (symmetric: no zero point);
  * `W_shape`: int `[2]`, the unpacked `[out, in]`.
The decoded tensor is `bf16(fp32(c - 8) * fp32(scale))` under the name `W` (what compressed-tensors' own decompress
computes in bf16: the product of a 4-bit integer and a bf16 scale is exact in float32, rounded once), `W_scale` and
`W_shape` hidden. Only weight-only, symmetric, group- or channel-wise int4 without activation ordering is read; any
other scheme (zero points, int8, activation quantization, `g_idx`) is refused with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.errors import CorruptFileError, UnsupportedModelError
from converters.io.folder_view import FolderView
from converters.io.quantized_fp8 import (  # noqa: F401 - decode_fp8_blocks / decode_fp4_groups: importable from here too
    BF16,
    EXPERT_DTYPES,
    FP4_VALUES,
    SCALE_BIAS,
    Fp8Folder,
    decode_fp4_groups,
    decode_fp8_blocks,
)
from converters.io.safetensors import SafetensorsFolder, TensorInfo

MXFP4_BLOCK = 32  # values per scale


def decode_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """`[..., out, G, 16]` uint8 blocks and `[..., out, G]` uint8 scales -> float32 `[..., out, G*32]`."""
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise CorruptFileError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise CorruptFileError(f"MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)}")
    values = np.empty(blocks.shape[:-1] + (MXFP4_BLOCK,), np.float32)
    values[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    values[..., 1::2] = FP4_VALUES[blocks >> 4]
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - SCALE_BIAS)
    return values.reshape(values.shape[:-2] + (-1,))


@dataclass(frozen=True)
class _Mxfp4Tensor:
    blocks: TensorInfo
    scales: TensorInfo


class Mxfp4Folder(FolderView):
    """A `SafetensorsFolder` view in which every `X_blocks` + `X_scales` pair reads as the decoded `X`."""

    def __init__(self, folder: SafetensorsFolder):
        super().__init__(folder)
        self._quantized: dict[str, _Mxfp4Tensor] = {}
        names = folder.tensors
        for name, info in names.items():
            if name.endswith("_scales") and name[: -len("_scales")] + "_blocks" in names:
                continue
            if not name.endswith("_blocks"):
                self.tensors[name] = info
                continue
            base = name[: -len("_blocks")]
            scales = names.get(base + "_scales")
            if scales is None:
                raise CorruptFileError(f"{folder.folder}: {name} has no {base}_scales")
            if base in names:
                raise CorruptFileError(f"{folder.folder}: both {base} and its MXFP4 blocks are present")
            if len(info.shape) < 3 or info.shape[:-1] != scales.shape or info.shape[-1] != MXFP4_BLOCK // 2:
                raise CorruptFileError(
                    f"{folder.folder}: MXFP4 {name} {list(info.shape)} does not match {base}_scales "
                    f"{list(scales.shape)}"
                )
            *lead, out_dim, groups, _ = info.shape
            shape = (*lead, groups * MXFP4_BLOCK, out_dim)
            self.tensors[base] = TensorInfo(base, BF16, shape, -1, int(np.prod(shape)) * BF16.itemsize, info.path)
            self._quantized[base] = _Mxfp4Tensor(info, scales)

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        q = self._quantized.get(name)
        if q is None:
            return self.inner.read(name, rows)
        if len(q.blocks.shape) < 4 and rows is not None:
            raise ValueError(f"{name}: row ranges need a leading (expert) axis")
        blocks = self.inner.read(q.blocks.name, rows)
        scales = self.inner.read(q.scales.name, rows)
        return np.ascontiguousarray(np.swapaxes(decode_mxfp4(blocks, scales), -1, -2), dtype=BF16)


INT4_BITS = 4
INT4_OFFSET = 8  # codes are stored unsigned, value + 8


def decode_int4_groups(packed: np.ndarray, scale: np.ndarray, in_features: int, group: int) -> np.ndarray:
    """int32 `[m, ceil(in/8)]` packed codes and `[m, ceil(in/group)]` scales -> bfloat16 `[m, in]`."""
    if packed.dtype != np.int32:
        raise CorruptFileError(f"int4 packed weights must be int32, got {packed.dtype}")
    m = packed.shape[0]
    if packed.shape[1] != -(-in_features // 8) or scale.shape != (m, -(-in_features // group)):
        raise CorruptFileError(
            f"int4 packed {list(packed.shape)} / scale {list(scale.shape)} do not hold a [{m}, {in_features}] weight "
            f"in groups of {group}"
        )
    words = packed.astype("<i4").view(np.uint8)  # 4 little-endian bytes per word, 2 codes per byte, low nibble first
    codes = np.empty((m, words.shape[1] * 2), np.int8)
    codes[:, 0::2] = words & 0x0F
    codes[:, 1::2] = words >> 4
    # each group's codes times its scale in place (a [m, groups, group] view), not against a full-size gathered
    # scale array: the same float32 products, ~10x faster on a Kimi-K2 expert
    groups = scale.shape[1]
    values = np.zeros((m, groups * group), np.float32)
    np.subtract(codes[:, :in_features], INT4_OFFSET, out=values[:, :in_features], casting="unsafe")
    values.reshape(m, groups, group)[...] *= scale.astype(np.float32)[:, :, None]
    return values[:, :in_features].astype(BF16)


def _int4_scheme(qc: dict, where: Path) -> int:
    """The group size of a compressed-tensors int4 pack-quantized config, or UnsupportedModelError with why not."""

    def refuse(why: str):
        raise UnsupportedModelError(
            f"{where}: compressed-tensors checkpoint not supported: {why} (ckptflow reads weight-only symmetric int4 "
            "pack-quantized weights, as moonshotai/Kimi-K2-Thinking)"
        )

    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        refuse("no config_groups")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        refuse(f"quantization_status {status!r}")
    sizes = set()
    for name, g in groups.items():
        w = (g or {}).get("weights") or {}
        fmt = (g or {}).get("format") or qc.get("format")
        if fmt != "pack-quantized":
            refuse(f"group {name}: format {fmt!r}")
        if (g or {}).get("input_activations") or (g or {}).get("output_activations"):
            refuse(f"group {name}: quantized activations")
        if w.get("num_bits") != INT4_BITS or w.get("type", "int") != "int" or not w.get("symmetric", True):
            refuse(f"group {name}: {w.get('num_bits')}-bit {w.get('type')} symmetric={w.get('symmetric')}")
        if w.get("actorder") or w.get("dynamic"):
            refuse(f"group {name}: activation ordering / dynamic weights")
        strategy = w.get("strategy")
        size = w.get("group_size")
        if strategy == "group" and isinstance(size, int) and size > 0:
            sizes.add(size)
        elif strategy == "channel":
            sizes.add(0)  # one scale per row
        else:
            refuse(f"group {name}: strategy {strategy!r} with group_size {size!r}")
    if len(sizes) != 1:
        refuse(f"several group sizes {sorted(sizes)}")
    return sizes.pop()


class Int4Folder(FolderView):
    """A `SafetensorsFolder` view in which every `X_packed` + `X_scale` (+ `X_shape`) reads as the decoded bf16 `X`
    (compressed-tensors pack-quantized int4, groups of `group` inputs; 0: one group per row)."""

    def __init__(self, folder: SafetensorsFolder, group: int):
        super().__init__(folder)
        self.group = group
        self._quantized: dict[str, tuple[TensorInfo, TensorInfo, TensorInfo | None]] = {}
        names = folder.tensors
        for name, info in names.items():
            if not name.endswith("_packed"):
                base = name.rsplit("_", 1)[0]
                if name.endswith(("_scale", "_shape")) and base + "_packed" in names:
                    continue
                if name.endswith(("_zero_point", "_g_idx")) and base.rsplit("_", 1)[0] + "_packed" in names:
                    raise UnsupportedModelError(f"{folder.folder}: {name}: int4 zero points / g_idx not supported")
                self.tensors[name] = info
                continue
            base = name[: -len("_packed")]
            scale = names.get(base + "_scale")
            if scale is None or len(info.shape) != 2 or info.dtype != np.int32 or len(scale.shape) != 2:
                raise CorruptFileError(
                    f"{folder.folder}: int4 {name} {info.dtype} {list(info.shape)} without a 2-D {base}_scale"
                )
            if base in names:
                raise CorruptFileError(f"{folder.folder}: both {base} and its int4 packing are present")
            out_dim, words = info.shape
            in_dim = words * 8 if not group else min(words * 8, scale.shape[1] * group)
            if (
                scale.shape[0] != out_dim
                or -(-in_dim // 8) != words
                or -(-in_dim // (group or in_dim)) != scale.shape[1]
            ):
                raise CorruptFileError(
                    f"{folder.folder}: int4 {name} {list(info.shape)} does not match {base}_scale {list(scale.shape)}"
                    f" in groups of {group or 'a row'}"
                )
            shape = (out_dim, in_dim)
            self.tensors[base] = TensorInfo(base, BF16, shape, -1, out_dim * in_dim * BF16.itemsize, info.path)
            self._quantized[base] = (info, scale, names.get(base + "_shape"))

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        q = self._quantized.get(name)
        if q is None:
            return self.inner.read(name, rows)
        packed, scale, stored = q
        shape = self.tensors[name].shape
        if stored is not None:
            want = tuple(int(n) for n in self.inner.read(stored.name).reshape(-1))
            if want != shape:  # the packing pads `in` up to 8 codes (and the scales to whole groups)
                raise UnsupportedModelError(
                    f"{self.folder}: int4 {name} is {list(want)}, packed as {list(shape)}: padded rows not supported"
                )
        w = self.inner.read(packed.name, rows)
        s = self.inner.read(scale.name, rows)
        return decode_int4_groups(w, s, shape[1], self.group or shape[1])


SCALE_FMTS = (None, "float", "ue8m0")
V4_BLOCK = [128, 128]


def _fp8_scheme(qc: dict, cfg: dict, where: Path) -> tuple[tuple[int, int], str | None]:
    """The block size and expert storage of an FP8 config, or UnsupportedModelError with why not."""

    def refuse(why: str):
        raise UnsupportedModelError(
            f"{where}: FP8 checkpoint not supported: {why} (ckptflow reads e4m3 with 2-D block scales, float or "
            "ue8m0, as the DeepSeek-V3 / V4 repos)"
        )

    fmt = qc.get("fmt", "e4m3")
    block = qc.get("weight_block_size") or [128, 128]
    if fmt != "e4m3":
        refuse(f"fmt {fmt!r}")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        refuse(f"weight_block_size {block!r}")
    if qc.get("scale_fmt") not in SCALE_FMTS:
        refuse(f"scale_fmt {qc.get('scale_fmt')!r}")
    # DeepSeek-V4 ships expert_dtype at the top of config.json; transformers (and V4.1) keep it in quantization_config
    expert_dtype = qc.get("expert_dtype", cfg.get("expert_dtype"))
    if cfg.get("expert_dtype", expert_dtype) != expert_dtype:
        refuse(f"expert_dtype {cfg['expert_dtype']!r} in the config but {expert_dtype!r} in quantization_config")
    if expert_dtype is not None and expert_dtype not in EXPERT_DTYPES:
        refuse(f"expert_dtype {expert_dtype!r} (one of {', '.join(EXPERT_DTYPES)})")
    if (expert_dtype is not None or cfg.get("model_type") == "deepseek_v4") and block != V4_BLOCK:
        refuse(f"weight_block_size {block} for DeepSeek-V4, whose scales are per 128x128 block")
    return (block[0], block[1]), expert_dtype


def decoded_source(folder: SafetensorsFolder, cfg: dict):
    """The folder as the family mapping expects it: itself, or a decoding view for a quantized checkpoint."""
    qc = cfg.get("quantization_config")
    if not qc:
        return folder
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method == "mxfp4":
        return Mxfp4Folder(folder)
    if method == "fp8":
        return Fp8Folder(folder, *_fp8_scheme(qc, cfg, Path(folder.folder)))
    if method == "compressed-tensors":
        return Int4Folder(folder, _int4_scheme(qc, Path(folder.folder)))
    raise UnsupportedModelError(
        f"{Path(folder.folder)}: quantized checkpoint (quant_method {method!r}) not supported; "
        "ckptflow reads bf16/fp16/fp32 weights, MXFP4 (gpt-oss), FP8 block-scaled (DeepSeek) and int4 pack-quantized "
        "(compressed-tensors, Kimi-K2-Thinking)"
    )
