"""DeepSeek's FP8 block-scaled checkpoints, decoded while reading: V3 / V3.1 / V3.2 (and Kimi-K2-Instruct, Qwen3.5-FP8),
and V4 (deepseek-ai/DeepSeek-V4-Flash / -Pro: FP8 linears, FP4 routed experts). `converters.io.quantized.decoded_source`
picks this view for `quantization_config.quant_method == "fp8"`.

V3 layout: a linear weight `W` `[M, N]` is float8 e4m3 with a companion `W_scale_inv` `[ceil(M/128), ceil(N/128)]`
(float32; uint8 read as E8M0), one factor per `weight_block_size` = [b0, b1] block, which -- despite its name --
*multiplies* the block's values.

V4 layout (`"scale_fmt": "ue8m0"`, `"expert_dtype": "fp4"`; established from DeepSeek's inference/model.py `Linear` and
convert.py `cast_e2m1fn_to_e4m3fn`, transformers 5.24's finegrained_fp8 `Fp8Dequantize` and `.scale` ->
`weight_scale_inv` rename, MaxText's standalone_scripts/deepseek_dequantize.py, and the published shards' dtypes):
  * the scale of `<m>.weight` is `<m>.scale` (not `<m>.weight_scale_inv`), stored as safetensors `F8_E8M0`: one byte
    per block, the factor 2^(byte - 127) (0xFF is NaN: refused);
  * FP8 linears (attention wq_a / wq_b / wkv / wo_a / wo_b, the indexer's wq_b, the shared expert's w1 / w2 / w3, the
    MTP e_proj / h_proj) are `F8_E4M3` `[M, N]` with `[ceil(M/128), ceil(N/128)]` scales, as in V3;
  * routed experts `layers.<i>.ffn.experts.<e>.w1/w2/w3.weight` `[out, in]` are FP4 (E2M1) stored as `I8`
    `[out, in/2]`, two values per byte, the even input in the low nibble; their scales are `[out, in/32]`, one per 32
    consecutive inputs of a row;
  * the rest is unquantized: BF16 embedding, head, norms, router weight, the compressors' wkv / wgate and the
    indexer's weights_proj; F32 attention sinks, compressor `ape`, router bias and the hyper-connection `hc_*`
    tensors; the hash layers' `tid2eid` integers.
E2M1 is sign bit 3, exponent bits 2-1, mantissa bit 0: magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}. A packed FP4 weight may
also come as safetensors `F4` (`torch.float4_e2m1fn_x2`, same bytes), which transformers reads too (MaxText's script
only reads `I8`). Which weights are FP4 and which FP8 follows from their dtype, as in both readers.

Every decoded tensor is `bf16(fp32(W) * fp32(scale))` under the name `W`, the scale hidden (MaxText's script and
transformers compute exactly this: checked bit for bit against both); unquantized tensors pass through unchanged. Each
tensor -- for the experts, each expert's matrix -- is decoded on its own, or a range of its rows, CHUNK_ROWS rows at a
time. NaN inputs are refused instead of decoded (CorruptFileError): an E8M0 scale 0xFF and an e4m3 code 0x7F / 0xFF
(MaxText's script writes NaNs for them; no published checkpoint has any).
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np

from converters.errors import CorruptFileError
from converters.io import buffers
from converters.io.folder_view import FolderView
from converters.io.safetensors import FP4X2, SafetensorsFolder, TensorInfo

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32
)
SCALE_BIAS = 127  # E8M0
FP4_GROUP = 32  # inputs per FP4 scale
# packed E2M1 pairs: as DeepSeek-V4 ships them (I8), as torch saves float4_e2m1fn_x2 (F4)
FP4_STORAGE = (np.dtype(np.int8), FP4X2)
EXPERT_DTYPES = ("fp4", "fp8", "bf16")
# every byte's two E2M1 float32 values as one word (low nibble first, little-endian); e4m3 codes' values; E8M0 codes'
# factors (0xFF, NaN, is refused before lookup)
_E2M1_PAIR_BITS = (
    np.stack([FP4_VALUES[np.arange(256) & 0x0F], FP4_VALUES[np.arange(256) >> 4]], axis=-1).view(np.uint64).ravel()
)
_E4M3_VALUES = np.arange(256, dtype=np.uint8).view(FP8).astype(np.float32)
_E8M0_FACTORS = np.append(np.ldexp(np.float32(1), np.arange(255) - SCALE_BIAS), np.nan).astype(np.float32)
_ROUTED_EXPERT = re.compile(r"(^|\.)experts\.\d+\.w[123]\.weight$")
# The tensors deepseek-ai/DeepSeek-V4-Flash quantizes (DeepSeek's inference/model.py, the shards' dtypes), for writers
# of synthetic sources (the test quantizer, the benchmark); the decoder goes by each tensor's dtype, not by its name.
V4_FP8_LINEAR = re.compile(
    r"(^|\.)(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123]|e_proj|h_proj)\.weight$"
)
V4_FP4_EXPERT = re.compile(r"(^|\.)ffn\.experts\.\d+\.w[123]\.weight$")


def scale_factors(scale: np.ndarray) -> np.ndarray:
    """Block scales as float32 factors: E8M0 (or uint8) codes -> 2^(code - 127); float scales as they are."""
    if scale.dtype in (E8M0, np.uint8):
        codes = scale.view(np.uint8)
        if codes.size and codes.max() == 0xFF:
            raise CorruptFileError("an E8M0 block scale is 0xFF (NaN)")
        return _E8M0_FACTORS[codes]
    if scale.dtype in (np.float32, BF16, np.float16, np.float64):
        return scale.astype(np.float32)
    raise CorruptFileError(f"block scales must be float or E8M0, got {scale.dtype}")


CHUNK_ROWS = 32  # rows decoded at a time: their float32 values stay in the core's cache


def decode_fp8_blocks(w: np.ndarray, scale: np.ndarray, block: tuple[int, int], row0: int = 0) -> np.ndarray:
    """float8 `[m, N]` (rows row0.. of the full tensor) times its block scales -> bfloat16 `[m, N]`.

    `scale` holds the scale rows of the blocks those rows fall in, starting at block row0 // block[0]."""
    factors = scale_factors(scale)
    codes = w.view(np.uint8) if w.dtype == FP8 else None
    if codes is not None and codes.size and ((codes & 0x7F) == 0x7F).any():
        raise CorruptFileError("a float8 e4m3 value is NaN (code 0x7F / 0xFF)")
    m, n = w.shape
    b0, b1 = block
    first = row0 // b0
    if m and (((row0 + m - 1) // b0 - first) >= factors.shape[0] or (n and -(-n // b1) > factors.shape[1])):
        raise CorruptFileError(f"FP8 scales {list(scale.shape)} do not cover a [{m}, {n}] weight in {b0}x{b1} blocks")
    out = buffers.empty((m, n), BF16)  # reused memory: no fresh pages to fault in
    buf = np.empty((min(m, CHUNK_ROWS), n), np.float32)
    r = 0
    while r < m:  # chunks within one block row: one row of factors, repeated over each block's columns
        g = (row0 + r) // b0
        end = min(m, (g + 1) * b0 - row0, r + CHUNK_ROWS)
        f = buf[: end - r]
        if codes is not None:
            np.take(_E4M3_VALUES, codes[r:end], out=f)
        else:
            f[...] = w[r:end]
        with np.errstate(over="ignore"):  # a huge scale times a large value is inf, as in float32 anywhere
            f *= np.repeat(factors[g - first], b1)[:n]
        out[r:end] = f  # rounded to nearest even
        r = end
    return out


def decode_fp4_groups(packed: np.ndarray, scale: np.ndarray, group: int = FP4_GROUP) -> np.ndarray:
    """Packed E2M1 `[m, n/2]` (int8 / uint8 / F4 bytes, low nibble = even element) and `[m, n/group]` scales ->
    bfloat16 `[m, n]`."""
    if packed.dtype not in (*FP4_STORAGE, np.uint8) or packed.ndim != 2:
        raise CorruptFileError(f"FP4 weights must be 2-D packed bytes, got {packed.dtype} {list(packed.shape)}")
    m, n = packed.shape[0], 2 * packed.shape[1]
    if n % group or scale.shape != (m, n // group):
        raise CorruptFileError(
            f"FP4 scales {list(scale.shape)} do not match a [{m}, {n}] weight in groups of {group} inputs"
        )
    factors = scale_factors(scale)
    # a 2-significant-bit value times a power of two is exact in bfloat16 (whose exponent range is float32's), so
    # its bits are the float32's top half: the same result as rounding, without the rounding pass
    exact = scale.dtype in (E8M0, np.uint8)
    out = buffers.empty((m, n), np.uint16 if exact else BF16)  # reused memory: no fresh pages to fault in
    codes = packed.view(np.uint8)
    buf = np.empty((min(m, CHUNK_ROWS), n // 2), np.uint64)  # each byte's two float32 values
    for r in range(0, m, CHUNK_ROWS):
        end = min(m, r + CHUNK_ROWS)
        pairs = np.take(_E2M1_PAIR_BITS, codes[r:end], out=buf[: end - r])
        values = pairs.view(np.float32)  # [rows, n]
        with np.errstate(over="ignore"):  # 6 * 2^127 is inf, as in float32 anywhere
            values.reshape(end - r, n // group, group)[...] *= factors[r:end, :, None]
        if exact:
            np.right_shift(values.view(np.uint32), 16, out=out[r:end], casting="unsafe")
        else:
            out[r:end] = values
    return out.view(BF16)


class Fp8Folder(FolderView):
    """A `SafetensorsFolder` view in which every weight with block scales reads as the decoded bfloat16 weight:
    float8 `X` with `X_scale_inv` (V3) or `<m>.weight` with `<m>.scale` (V4, whose FP4 weights decode too).

    `expert_dtype` (V4's "fp4" / "fp8" / "bf16"): the format every quantized routed expert
    `...experts.<e>.w1/w2/w3.weight` must have; None: not checked."""

    SUFFIX = "_scale_inv"

    def __init__(self, folder: SafetensorsFolder, block: tuple[int, int], expert_dtype: str | None = None):
        super().__init__(folder)
        self.block = block
        self._scales: dict[str, str] = {}  # weight -> its scale, as the folder names them (aliases applied)
        self._fp4: set[str] = set()
        names = folder.tensors
        scale_of: dict[str, str] = {}
        for name in names:
            found = [s for s in (name + self.SUFFIX, _v4_scale_name(name)) if s and s in names]
            if len(found) > 1:
                raise CorruptFileError(f"{folder.folder}: {name} has two scales, {found[0]} and {found[1]}")
            if found:
                scale_of[name] = found[0]
        hidden = set(scale_of.values())
        for name, info in names.items():
            if name in hidden:
                continue
            scale = scale_of.get(name)
            if scale is None:
                if info.dtype == FP8:
                    raise CorruptFileError(
                        f"{folder.folder}: {name} is {info.dtype} without {name}{self.SUFFIX} or a .scale"
                    )
                self.tensors[name] = info
            else:
                self._add_quantized(folder, name, info, scale)
            _check_expert(folder, name, info, scale, expert_dtype)

    def _add_quantized(self, folder, name: str, info: TensorInfo, scale_name: str) -> None:
        where = f"{folder.folder}: {name}"
        scale = folder.tensors[scale_name]
        if scale.dtype not in (E8M0, np.uint8, np.float32, BF16, np.float16):
            raise CorruptFileError(f"{where}: its scale {scale_name} is {scale.dtype}, not float or E8M0")
        if len(info.shape) != 2:
            raise CorruptFileError(f"{where} {list(info.shape)} with block scales is not a matrix")
        if info.dtype == FP8:
            shape, want = info.shape, tuple(-(-n // b) for n, b in zip(info.shape, self.block))
            what = f"{self.block[0]}x{self.block[1]} blocks"
        elif info.dtype in FP4_STORAGE:
            shape = (info.shape[0], 2 * info.shape[1])
            want, what = (shape[0], shape[1] // FP4_GROUP), f"FP4 groups of {FP4_GROUP} inputs"
            if shape[1] % FP4_GROUP:
                raise CorruptFileError(f"{where}: FP4 [{shape[0]}, {shape[1]}] is not in whole groups of {FP4_GROUP}")
            self._fp4.add(name)
        else:
            raise CorruptFileError(
                f"{where} is {info.dtype} but has a scale {scale_name} (ckptflow decodes float8 e4m3 with block "
                "scales and FP4 packed as int8 / F4)"
            )
        if scale.shape != want:
            raise CorruptFileError(
                f"{where} {list(shape)} does not match its scale {scale_name} {list(scale.shape)} for {what}"
            )
        self.tensors[name] = TensorInfo(name, BF16, shape, -1, int(np.prod(shape)) * BF16.itemsize, info.path)
        self._scales[name] = scale_name

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        scale = self._scales.get(name)
        if scale is None:
            return self.inner.read(name, rows)
        w = self.inner.read(name, rows)
        try:
            if name in self._fp4:  # one scale row per weight row
                return decode_fp4_groups(w, self.inner.read(scale, rows))
            start = 0 if rows is None else rows.start or 0
            stop = start + w.shape[0]
            s = (
                self.inner.read(scale, slice(start // self.block[0], -(-stop // self.block[0])))
                if w.shape[0]
                else self.inner.read(scale)
            )
            return decode_fp8_blocks(w, s, self.block, start)
        except CorruptFileError as e:
            raise CorruptFileError(f"{self.folder}: {name}: {e}") from None


def _v4_scale_name(name: str) -> str | None:
    return name[: -len(".weight")] + ".scale" if name.endswith(".weight") else None


def _check_expert(folder, name: str, info: TensorInfo, scale: str | None, expert_dtype: str | None) -> None:
    """A routed expert quantized otherwise than `expert_dtype` says: refused, rather than decoded on a guess. An
    unquantized one is read whatever the config says: a dequantized copy (MaxText's deepseek_dequantize.py output)
    keeps the original config.json."""
    if expert_dtype is None or scale is None or not _ROUTED_EXPERT.search(name):
        return
    kind = "fp8" if info.dtype == FP8 else "fp4"
    if kind != expert_dtype:
        raise CorruptFileError(
            f"{folder.folder}: routed expert {name} is stored as {kind} ({info.dtype} with {scale}), but the config "
            f"says expert_dtype {expert_dtype!r}"
        )
