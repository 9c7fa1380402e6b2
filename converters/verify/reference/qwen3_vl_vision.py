"""What MaxText 0.2.5 computes in Qwen3-VL's vision tower (`Qwen3VLVisionEncoder` + `Qwen3VLVisionProjector`).

MaxText's classes (models/qwen3.py `Qwen3OmniMoeVision*`, layers/embeddings.py
`Qwen3OmniMoeVisionPosEmbedInterpolate` / `Qwen3OmniMoeVisionRotaryEmbedding` / `generate_block_coords`,
layers/attentions.py with `is_vision=True`), for one image of `grid_thw = (t, h, w)` patches whose pixels come as
HF's processor gives them, `[t*h*w, C*tps*ps*ps]`, patches already in the 2x2-merge-block order (MaxText reshapes
the same buffer to `[-1, C, tps, ps, ps]`):

  * patch embedding: the 3D conv with stride = kernel, i.e. one dense map of each patch, plus bias (float32);
  * positions: the square `pos_embed` grid (side n) sampled bilinearly at (row, col) * (n-1) / (h-1, w-1), the
    (row, col) of token s read from the block order (`generate_block_coords`); MaxText casts the interpolated
    table to bfloat16 before adding it (`cast_as_fprop_dtype` with its default `fprop_dtype=bfloat16`);
  * blocks: x += attn(LN1(x)); x += fc2(gelu_tanh(fc1(LN2(x)))); attention over the whole image, no mask,
    q/k rotated by 2D rotary embedding (head_dim/4 frequencies of theta 10000: rows' then columns' angles,
    doubled, half-split rotation), query scaled by head_dim**-0.5 at run time; LayerNorm eps 1e-6
    (`normalization_layer_epsilon`);
  * deepstack: the output of block `deepstack_visual_indexes[k]`, 4 consecutive tokens concatenated, LayerNorm over
    4H, fc1, GELU, fc2 (`merger_<k>`); the projector: LayerNorm over H, then the same on the final output;
  * MaxText's merger GELU is `jax.nn.gelu`'s default, the tanh approximation; HF's `nn.GELU()` is exact.

`maxtext_numerics=False` (what verify's layout check compares with transformers) follows HF in the two places
where MaxText's tower computes something else whatever the checkpoint holds: the exact merger GELU and the float32
position table. `maxtext_numerics=True` is MaxText's own computation; the family warns about the difference.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from converters.errors import CkptflowError
from converters.families.qwen3_5 import NO_TOWER
from converters.families.qwen3_vl_vision import ENCODER, PROJECTOR
from converters.verify.reference.common import require

EPS = 1e-6  # MaxText's normalization_layer_epsilon in the qwen3-vl ymls; HF hard-codes 1e-6 in the tower
ROPE_THETA = 10000.0  # MaxText rope_theta_for_vit (base.yml); HF's vision rope_parameters default


class VisionSpec(NamedTuple):
    """The tower's sizes (hashable: a jit static argument)."""

    layers: int
    hidden: int
    heads: int
    mlp: int
    channels: int
    patch: int
    temporal_patch: int
    merge: int
    out: int
    positions: int
    deepstack: tuple[int, ...]
    rope_theta: float = ROPE_THETA
    maxtext_numerics: bool = False
    encoder: str = ENCODER  # MaxText's module paths (Qwen3.5: `Qwen3_5MoeVisionEncoder_0` / `..Projector_0`)
    projector: str = PROJECTOR

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def vision_spec(v, *, maxtext_numerics: bool = False, encoder: str = ENCODER, projector: str = PROJECTOR) -> VisionSpec:
    """From a transformers `Qwen3VLVisionConfig` (or Qwen3.5's, which has no deepstack); refuses what MaxText's tower
    does not compute."""
    act = getattr(v, "hidden_act", "gelu_pytorch_tanh")
    require(act in ("gelu_pytorch_tanh", "gelu_tanh"), f"vision hidden_act={act!r} (MaxText's blocks use GELU tanh)")
    rp = dict(getattr(v, "rope_parameters", None) or {})
    require(rp.get("rope_type", "axial") == "axial", f"vision rope_type={rp.get('rope_type')!r}")
    theta = float(rp.get("rope_theta", ROPE_THETA))
    require(theta == ROPE_THETA, f"vision rope_theta={theta} (MaxText's rope_theta_for_vit is {ROPE_THETA})")
    for k in ("patch_size", "temporal_patch_size"):
        require(isinstance(getattr(v, k), int), f"vision {k}={getattr(v, k)!r} (one int)")
    return VisionSpec(
        layers=int(v.depth),
        hidden=int(v.hidden_size),
        heads=int(v.num_heads),
        mlp=int(v.intermediate_size),
        channels=int(v.in_channels),
        patch=int(v.patch_size),
        temporal_patch=int(v.temporal_patch_size),
        merge=int(v.spatial_merge_size),
        out=int(v.out_hidden_size),
        positions=int(v.num_position_embeddings),
        deepstack=tuple(int(i) for i in (getattr(v, "deepstack_visual_indexes", None) or ())),
        maxtext_numerics=maxtext_numerics,
        encoder=encoder,
        projector=projector,
    )


def _merger_keys(prefix: str) -> tuple[str, ...]:
    return tuple(
        f"{prefix}{m}/{w}" for m in ("ln_q", "mlp_0", "mlp_2") for w in ("scale" if m == "ln_q" else "kernel", "bias")
    )


BLOCK_KEYS = (
    "ln1/scale",
    "ln1/bias",
    "ln2/scale",
    "ln2/bias",
    *(f"attn/attn/{m}/{w}" for m in ("query", "key", "value", "out") for w in ("kernel", "bias")),
    "mlp/kernel",
    "mlp/bias",
    "mlp_out/kernel",
    "mlp_out/bias",
)


def vision_keys(vs: VisionSpec) -> tuple[str, ...]:
    """Every array of the tower (global keys of the Qwen3-VL reference when the checkpoint is multimodal)."""
    keys = [
        f"{vs.encoder}/patch_embed/proj/kernel",
        f"{vs.encoder}/patch_embed/proj/bias",
        f"{vs.encoder}/pos_embed_interpolate/pos_embed",
    ]
    keys += [f"{vs.encoder}/blocks_{i}/{k}" for i in range(vs.layers) for k in BLOCK_KEYS]
    for k in range(len(vs.deepstack)):
        keys += _merger_keys(f"{vs.encoder}/merger_{k}/")
    keys += _merger_keys(f"{vs.projector}/merger/")
    return tuple(keys)


# ------------------------------------------------------------------------------------------------ compute


def layer_norm(x, scale, bias):
    """flax nnx.LayerNorm in float32 (mean, variance over the last axis, eps 1e-6)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + EPS) * scale + bias


def block_coords(t: int, h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each token in the merge-block order (MaxText `generate_block_coords`, HF's processor order)."""
    s = np.arange(t * h * w) % (h * w)
    intra_col = s % merge
    intra_row = (s // merge) % merge
    block_col = (s // (merge * merge)) % (w // merge)
    block_row = s // ((w // merge) * merge * merge)
    return block_row * merge + intra_row, block_col * merge + intra_col


def interpolated_positions(table, row, col, h: int, w: int):
    """Bilinear samples of the square position grid (MaxText `Qwen3OmniMoeVisionPosEmbedInterpolate`)."""
    n = int(round(table.shape[0] ** 0.5))
    grid = table.reshape(n, n, -1)
    y = jnp.asarray(row / max(h - 1, 1), jnp.float32) * (n - 1)
    x = jnp.asarray(col / max(w - 1, 1), jnp.float32) * (n - 1)
    y0 = jnp.floor(y).astype(jnp.int32)
    x0 = jnp.floor(x).astype(jnp.int32)
    y1 = jnp.minimum(y0 + 1, n - 1)
    x1 = jnp.minimum(x0 + 1, n - 1)
    dy = (y - y0)[:, None]
    dx = (x - x0)[:, None]
    return (
        (1.0 - dy) * (1.0 - dx) * grid[y0, x0]
        + (1.0 - dy) * dx * grid[y0, x1]
        + dy * (1.0 - dx) * grid[y1, x0]
        + dy * dx * grid[y1, x1]
    )


def rotary(x, row, col, theta: float):
    """2D rotary embedding of [S, N, D] (MaxText `Qwen3OmniMoeVisionRotaryEmbedding`, float32 cos/sin)."""
    d = x.shape[-1]
    half = d // 2
    inv = 1.0 / (theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))
    ang = jnp.concatenate(
        [jnp.asarray(row, jnp.float32)[:, None] * inv, jnp.asarray(col, jnp.float32)[:, None] * inv], -1
    )
    ang = jnp.concatenate([ang, ang], axis=-1)[:, None, :]
    rot = jnp.concatenate([-x[..., d // 2 :], x[..., : d // 2]], axis=-1)
    return x * jnp.cos(ang) + rot * jnp.sin(ang)


def _merger(vs: VisionSpec, g, prefix: str, x, post_shuffle: bool):
    s, H = x.shape
    m2 = vs.merge * vs.merge
    w = lambda k: g[prefix + k].astype(jnp.float32)  # noqa: E731
    if post_shuffle:
        x = layer_norm(x.reshape(s // m2, m2 * H), w("ln_q/scale"), w("ln_q/bias"))
    else:
        x = layer_norm(x, w("ln_q/scale"), w("ln_q/bias")).reshape(s // m2, m2 * H)
    x = x @ w("mlp_0/kernel") + w("mlp_0/bias")
    x = jax.nn.gelu(x, approximate=vs.maxtext_numerics)
    return x @ w("mlp_2/kernel") + w("mlp_2/bias")


def vision_image(vs: VisionSpec, g: dict, patches, grid: tuple[int, int, int]):
    """One image: patches `[t*h*w, C*tps*ps*ps]` -> (tokens `[t*h*w/4, out]`, deepstack features, each the same shape).
    `g`: the tower's arrays by path (any dtype; the tower computes in float32, MaxText's `dtype_mm`)."""
    t, h, w = grid
    D = vs.head_dim
    f32 = jnp.float32
    p = lambda k: g[k].astype(f32)  # noqa: E731
    x = patches.astype(f32).reshape(-1, vs.channels, vs.temporal_patch, vs.patch, vs.patch)
    # flax conv on channels-last patches, stride = kernel: each output is one patch's dot with the kernel
    x = jnp.einsum("scijk,ijkch->sh", x, p(f"{vs.encoder}/patch_embed/proj/kernel"))
    x = x + p(f"{vs.encoder}/patch_embed/proj/bias")
    row, col = block_coords(t, h, w, vs.merge)
    pos = interpolated_positions(p(f"{vs.encoder}/pos_embed_interpolate/pos_embed"), row, col, h, w)
    if vs.maxtext_numerics:
        pos = pos.astype(jnp.bfloat16).astype(f32)
    x = x + pos
    deep = []
    for i in range(vs.layers):
        b = f"{vs.encoder}/blocks_{i}/"
        a = b + "attn/attn/"
        y = layer_norm(x, p(b + "ln1/scale"), p(b + "ln1/bias"))
        q = jnp.einsum("sh,hnd->snd", y, p(a + "query/kernel")) + p(a + "query/bias")
        k = jnp.einsum("sh,hnd->snd", y, p(a + "key/kernel")) + p(a + "key/bias")
        v = jnp.einsum("sh,hnd->snd", y, p(a + "value/kernel")) + p(a + "value/bias")
        q = rotary(q, row, col, vs.rope_theta) * D**-0.5  # query_pre_attn_scalar, after RoPE
        k = rotary(k, row, col, vs.rope_theta)
        att = jax.nn.softmax(jnp.einsum("tnd,snd->nts", q, k), axis=-1)
        o = jnp.einsum("nts,snd->tnd", att, v)
        x = x + jnp.einsum("tnd,ndh->th", o, p(a + "out/kernel")) + p(a + "out/bias")
        y = layer_norm(x, p(b + "ln2/scale"), p(b + "ln2/bias"))
        y = jax.nn.gelu(y @ p(b + "mlp/kernel") + p(b + "mlp/bias"), approximate=True)
        x = x + y @ p(b + "mlp_out/kernel") + p(b + "mlp_out/bias")
        if i in vs.deepstack:
            deep.append(_merger(vs, g, f"{vs.encoder}/merger_{vs.deepstack.index(i)}/", x, True))
    return _merger(vs, g, f"{vs.projector}/merger/", x, False), deep


@functools.lru_cache(maxsize=None)
def _jitted():
    return jax.jit(vision_image, static_argnums=(0, 3))


def vision_features(vs: VisionSpec, g: dict, pixel_values, grid_thw) -> tuple[np.ndarray, list[np.ndarray]]:
    """All images of a prompt, as HF passes them (`pixel_values` `[sum t*h*w, C*tps*ps*ps]`, `image_grid_thw`
    `[n, 3]`): (image tokens `[sum t*h*w/4, out]`, one deepstack feature array of that shape per merger), float32."""
    pixel_values = np.asarray(pixel_values, np.float32)
    grids = [tuple(int(a) for a in row) for row in np.asarray(grid_thw).reshape(-1, 3)]
    if sum(t * h * w for t, h, w in grids) != pixel_values.shape[0]:
        raise CkptflowError(
            f"pixel_values has {pixel_values.shape[0]} patches; image_grid_thw {grids} needs another count"
        )
    for t, h, w in grids:
        if h % vs.merge or w % vs.merge:
            raise CkptflowError(f"image grid {(t, h, w)} is not a multiple of the {vs.merge}x{vs.merge} merge")
    g = {k: jnp.asarray(v) for k, v in g.items()}
    tokens, deep, at = [], [[] for _ in vs.deepstack], 0
    for grid in grids:
        n = grid[0] * grid[1] * grid[2]
        out, feats = _jitted()(vs, g, jnp.asarray(pixel_values[at : at + n]), grid)
        tokens.append(np.asarray(out))
        for k, f in enumerate(feats):
            deep[k].append(np.asarray(f))
        at += n
    return np.concatenate(tokens), [np.concatenate(d) for d in deep]


# ------------------------------------------------------------------------------ the tower in the decoder

# layer_markers: where deepstack feature k is added -- after layer k's block (a dense layer), or, when layer k is an
# MoE layer (whose last stage gets no per-prompt inputs), before layer k + 1 (the same hidden state)
DEEPSTACK_AFTER = "deepstack_after_{k}"
DEEPSTACK_BEFORE = "deepstack_before_{k}"


def mrope_positions(token_ids: np.ndarray, image_token: int, grids, merge: int) -> np.ndarray:
    """[3, T] (temporal, height, width) positions of a prompt holding images (HF `get_rope_index`, MaxText's
    `get_rope_index` for images): text counts on; an image's tokens sit at start + (0, row, col) of its merged grid,
    and the text after it resumes at start + max(rows, cols)."""
    ids = np.asarray(token_ids)
    out = np.zeros((3, ids.shape[0]), np.int64)
    pos, i, grids = 0, 0, list(grids)
    while i < ids.shape[0]:
        if ids[i] != image_token:
            out[:, i] = pos
            pos, i = pos + 1, i + 1
            continue
        t, h, w = (int(a) for a in grids.pop(0))
        gh, gw = h // merge, w // merge
        n = t * gh * gw
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        out[:, i : i + n] = np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + pos
        pos, i = pos + max(gh, gw), i + n
    return out


def mrope_frequency_positions(pos3: np.ndarray, section) -> np.ndarray:
    """[T, D/2] float32: the position each rotary frequency turns by (MaxText `_apply_interleaved_mrope`: frequency j
    takes the height position when j % 3 == 1 and j < 3 * section[1], the width one when j % 3 == 2 and
    j < 3 * section[2], else the temporal one). Multiplying by the inverse timescales gives MaxText's angles."""
    half = int(sum(section))
    which = np.zeros(half, np.int64)
    for axis, offset in ((1, 1), (2, 2)):
        which[offset : section[axis] * 3 : 3] = axis
    return np.asarray(pos3, np.float32)[which, :].T.copy()


def rope_frequency_positions(x, positions, theta: float, dtype):
    """Half-split RoPE where each frequency has its own position (`positions` [T, D/2], `mrope_frequency_positions`),
    with the text path's numerics (float32 angles pos * (1 / timescale), float32 sin/cos, cast back once)."""
    d = x.shape[-1]
    timescale = theta ** (2 * jnp.arange(d // 2, dtype=jnp.float32) / d)
    angle = positions.astype(jnp.float32)[:, None, :] * (1.0 / timescale)
    sin = jnp.sin(jnp.concatenate([angle, angle], axis=-1))
    cos = jnp.cos(jnp.concatenate([angle, angle], axis=-1))
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return (x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin).astype(dtype)


def patchify(image: np.ndarray, temporal_patch: int, patch: int, merge: int) -> np.ndarray:
    """One image `[C, H, W]` as HF's Qwen2-VL image processor flattens it: repeated over `temporal_patch` frames, cut
    into patches, the patches ordered merge block by merge block -> `[h*w, C*tps*ps*ps]`."""
    c, H, W = image.shape
    h, w = H // patch, W // patch
    x = np.repeat(image[None], temporal_patch, axis=0)  # [tps, C, H, W]
    x = x.reshape(temporal_patch, c, h // merge, merge, patch, w // merge, merge, patch)
    x = x.transpose(2, 5, 3, 6, 1, 0, 4, 7)  # [h/m, w/m, m, m, C, tps, ps, ps]
    return np.ascontiguousarray(x.reshape(h * w, c * temporal_patch * patch * patch))


def image_prompt(config: dict, *, seed: int = 0, tokenizer=None, grid: tuple[int, int] = (8, 12)):
    """For a multimodal Qwen3-VL config: (token ids, HF model inputs) of a prompt holding one generated image of
    `grid` (rows, cols) patches: text, <vision_start>, one image token per merged 2x2 block, <vision_end>, text.
    Pixels normalized as the Qwen3-VL processor does ((x - 0.5) / 0.5); `mm_token_type_ids` marks the image tokens
    (transformers' 3D positions). None for text-only configs."""
    from converters.verify.reference.common import hf_config_object
    from converters.verify.reference.gemma import test_image

    cfg = hf_config_object(config)
    if cfg.model_type not in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5_moe") or config.get(NO_TOWER):
        return None
    t, v = cfg.get_text_config(), cfg.vision_config
    image, start, end = int(cfg.image_token_id), int(cfg.vision_start_token_id), int(cfg.vision_end_token_id)
    special = {image, start, end, int(cfg.video_token_id)}
    rng = np.random.default_rng(seed + 7919)
    merge, patch = int(v.spatial_merge_size), int(v.patch_size)
    rows, cols = (max(merge, g // merge * merge) for g in grid)

    def text(n: int, words: str) -> list[int]:
        if tokenizer is not None:
            return [int(i) for i in tokenizer(words, add_special_tokens=False)["input_ids"]]
        return [int(i) for i in rng.integers(0, int(t.vocab_size), size=n) if int(i) not in special]

    ids = text(12, "Here is a picture:") + [start] + [image] * (rows * cols // merge**2) + [end]
    ids += text(48, " Describe what it shows, colour by colour, and say where the round shape is. It shows")
    side = max(rows, cols) * patch
    img = (test_image(int(v.in_channels), side)[:, : rows * patch, : cols * patch] - 0.5) / 0.5
    pixels = patchify(img, int(v.temporal_patch_size), patch, merge)
    types = np.asarray([[1 if i == image else 0 for i in ids]], np.int64)
    return ids, {
        "pixel_values": pixels,
        "image_grid_thw": np.asarray([[1, rows, cols]], np.int64),
        "mm_token_type_ids": types,
    }


class Qwen3VLVisionMixin:
    """The tower in a Qwen3-VL `Forward` (put it before the text model's class): the image prompt, its first stage
    (image tokens in place of the image-token embeddings, 3D positions, deepstack features) and the decoder layers'
    use of them. `spec` carries `vision` (a VisionSpec) and `image_token` for multimodal configs."""

    def image_prompt(self, config: dict, *, seed: int = 0, tokenizer=None):
        return image_prompt(config, seed=seed, tokenizer=tokenizer)

    @staticmethod
    def vision_options(cfg) -> tuple:
        """`ModelSpec.options` entries of a multimodal config (`cfg`: transformers' Qwen3VLConfig)."""
        if cfg.model_type not in ("qwen3_vl", "qwen3_vl_moe"):
            return ()
        t = cfg.get_text_config()
        rp = dict(getattr(t, "rope_parameters", None) or {})
        section = tuple(int(s) for s in (rp.get("mrope_section") or (24, 20, 20)))
        return (
            ("vision", vision_spec(cfg.vision_config)),
            ("image_token", int(cfg.image_token_id)),
            ("mrope_section", section),
        )

    def config_warnings(self, cfg) -> list[str]:
        out = list(super().config_warnings(cfg))
        if self.vision_options(cfg):
            out.append(
                "MaxText 0.2.5's Qwen3-VL (and Qwen3.5) vision tower applies tanh-approximated GELU in its patch "
                "mergers (HF: exact GELU) and rounds the interpolated position embedding to bfloat16 (HF: float32), "
                "whatever the checkpoint holds; the image prompt's reference follows transformers there (on the tiny "
                "test tower MaxText's way moves the image tokens by ~2e-4 relative)"
            )
        return out

    def global_keys(self, spec) -> tuple[str, ...]:
        keys = tuple(super().global_keys(spec))
        vs = spec.option("vision")
        return keys + vision_keys(vs) if vs is not None else keys

    def layer_markers(self, spec, l: int) -> dict:
        out = dict(super().layer_markers(spec, l))
        vs = spec.option("vision")
        if vs is None:
            return out
        mark = np.zeros((0,), np.float32)
        if l < len(vs.deepstack) and not self.moe_arrays(spec, l):
            out[DEEPSTACK_AFTER.format(k=l)] = mark
        if 0 < l <= len(vs.deepstack) and self.moe_arrays(spec, l - 1):
            out[DEEPSTACK_BEFORE.format(k=l - 1)] = mark
        return out

    def multimodal_embed(self, spec, g: dict, rows, index, token_ids: np.ndarray, inputs: dict):
        vs = spec.option("vision")
        if vs is None:
            raise CkptflowError("a prompt with an image needs a multimodal Qwen3-VL config and its vision tower")
        if "pixel_values_videos" in inputs:
            raise CkptflowError("video prompts are not verified (MaxText attends across frames, HF within each)")
        grids = np.asarray(inputs["image_grid_thw"]).reshape(-1, 3)
        image_token = spec.option("image_token")
        at = np.flatnonzero(np.asarray(token_ids) == image_token)
        need = sum(int(t * h * w) // vs.merge**2 for t, h, w in grids)
        if at.size != need:
            raise CkptflowError(
                f"the prompt has {at.size} image tokens; its images (grids {grids.tolist()}) need {need}"
            )
        n = len(vs.deepstack)
        if n >= spec.num_layers and self.moe_arrays(spec, spec.num_layers - 1):
            raise CkptflowError(
                f"an image prompt needs more decoder layers than deepstack features ({spec.num_layers} <= {n})"
                " when the last one is an MoE layer"
            )
        tokens, deep = vision_features(vs, g, inputs["pixel_values"], grids)
        x = self.embed(spec, rows, index)
        x = x.at[jnp.asarray(at)].set(jnp.asarray(tokens).astype(spec.jdtype))
        scattered = np.zeros((len(deep), x.shape[0], x.shape[1]), np.float32)
        for k, f in enumerate(deep):
            scattered[k, at] = f
        pos = mrope_frequency_positions(
            mrope_positions(token_ids, image_token, grids, vs.merge), spec.option("mrope_section")
        )
        return x, {"mrope": jnp.asarray(pos), "deepstack": jnp.asarray(scattered)}

    @staticmethod
    def _deepstack(p: dict, x, deepstack, marker: str):
        """MaxText's `deepstack_process`: feature k added at the image tokens (its rows are zero elsewhere)."""
        if deepstack is not None:
            for k in range(deepstack.shape[0]):
                if marker.format(k=k) in p:
                    x = (x.astype(jnp.float32) + deepstack[k]).astype(x.dtype)
        return x

    def block(self, spec, p: dict, x, positions, mrope=None, deepstack=None):
        """The text model's block at the image prompt's per-frequency positions, with the deepstack features."""
        x = self._deepstack(p, x, deepstack, DEEPSTACK_BEFORE)
        x = super().block(spec, p, x, positions if mrope is None else mrope)
        return self._deepstack(p, x, deepstack, DEEPSTACK_AFTER)

    def pre_moe(self, spec, p: dict, x, positions, mrope=None, deepstack=None):
        x = self._deepstack(p, x, deepstack, DEEPSTACK_BEFORE)
        return super().pre_moe(spec, p, x, positions if mrope is None else mrope)

    @staticmethod
    def rope(x, positions, theta: float, dtype):
        """Text prompts: [T] positions, every frequency turning by the token's one position (MaxText broadcasts a text
        position to (t, h, w) = (p, p, p)); image prompts: [T, D/2] per-frequency positions."""
        if positions.ndim == 1:
            positions = jnp.broadcast_to(positions.astype(jnp.float32)[:, None], (positions.shape[0], x.shape[-1] // 2))
        return rope_frequency_positions(x, positions, theta, dtype)
