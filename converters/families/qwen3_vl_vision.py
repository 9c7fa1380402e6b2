"""Qwen3-VL's vision tower (HF `model.visual.*`, MaxText `vision_encoder/Qwen3VLVisionEncoder_0` + `..Projector_0`).

Not a family of its own: the rules the Qwen3-VL family adds for a multimodal checkpoint (MaxText
`use_multimodal=true`, `vision_encoder_block: qwen3_vl`). The tower is never scanned. Qwen3.5 MoE's tower
(converters/families/qwen3_5.py) is the same without deepstack mergers, under MaxText's `Qwen3_5MoeVision*` names:
`vision_dims(..., encoder=, projector=, deepstack=False)`.

What MaxText 0.2.5 lays out (models/qwen3.py `Qwen3OmniMoeVision*`, which `models/qwen3_vl_vision.py` subclasses
unchanged; layers/embeddings.py; the real-size tree from `create_nnx_abstract_model`):
  * `patch_embed/proj/kernel` `[tps, ps, ps, C, H]`: HF's Conv3d weight `[H, C, tps, ps, ps]` channels-last
    (flax `nnx.Conv` on `[N, tps, ps, ps, C]` patches); `patch_embed/proj/bias` `[H]`;
  * `pos_embed_interpolate/pos_embed` `[num_position_embeddings, H]`, HF's `pos_embed.weight` as is;
  * `blocks_<i>/`: `ln1`, `ln2` (LayerNorm scale/bias, no +1), `attn/attn/{query,key,value}/kernel` `[H, N, D]`
    and `/bias` `[N, D]` cut from HF's fused `attn.qkv` (rows q | k | v), `attn/attn/out/kernel` `[N, D, H]`,
    `mlp` / `mlp_out` kernels `[in, out]` with biases;
  * `merger_<k>/` (the deepstack merger of `deepstack_visual_indexes[k]`; HF `deepstack_merger_list.<k>`) and
    the projector's `merger/` (HF `merger`): `ln_q` (LayerNorm over 4H after the 2x2 shuffle for the deepstack
    mergers, over H before it for the projector), `mlp_0` `[4H, 4H]`, `mlp_2` `[4H, out_hidden]`.
Nothing is scaled or permuted within a row: every tensor round-trips bit-exact.

What it computes (see converters/verify/reference/qwen3_vl_vision.py): conv patches + bilinearly interpolated
learned positions, pre-LN blocks with 2D (row, column) rotary attention over the whole image, GELU(tanh) MLPs;
the outputs of blocks `deepstack_visual_indexes` through their mergers, the last block's through the projector.
"""

from __future__ import annotations

from converters.core.mapping import LayerGroup, Rule
from converters.core.transforms import Chunks, Kernel, Permute, Reshape
from converters.errors import MappingError
from converters.families import common

ENCODER = "vision_encoder/Qwen3VLVisionEncoder_0"
PROJECTOR = "vision_encoder/Qwen3VLVisionProjector_0"
HF = "model.visual."

# transformers' Qwen3VLVisionConfig defaults, for keys a config leaves out (what transformers assumes is what the
# checkpoint means)
VISION_DEFAULTS = {
    "depth": 27,
    "hidden_size": 1152,
    "hidden_act": "gelu_pytorch_tanh",
    "intermediate_size": 4304,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 3584,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [8, 16, 24],
}


def vision_dims(
    vision_config: dict,
    text_hidden: int | None = None,
    *,
    family: str = "qwen3_vl",
    encoder: str = ENCODER,
    projector: str = PROJECTOR,
    deepstack: bool = True,
) -> dict:
    """The tower's sizes from HF's `vision_config`, refusing what MaxText's tower cannot hold. `encoder` / `projector`:
    MaxText's module paths (Qwen3.5's tower is this one under its own class names); `deepstack` False: a tower without
    deepstack mergers (Qwen3.5: transformers has none, whatever `deepstack_visual_indexes` says; a non-empty list is
    refused, as MaxText would build mergers the checkpoint cannot fill)."""
    defaults = VISION_DEFAULTS if deepstack else {**VISION_DEFAULTS, "deepstack_visual_indexes": []}
    v = {k: vision_config.get(k, default) for k, default in defaults.items()}
    if not deepstack and v["deepstack_visual_indexes"]:
        raise MappingError(
            f"{family}: deepstack_visual_indexes {v['deepstack_visual_indexes']}: this tower has no deepstack mergers"
        )
    for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size"):
        if not (isinstance(v[k], int) and not isinstance(v[k], bool) and v[k] > 0):
            raise MappingError(f"{family}: vision_config.{k} must be a positive integer, got {v[k]!r}")
    for k in ("temporal_patch_size", "spatial_merge_size", "out_hidden_size", "num_position_embeddings"):
        if not (isinstance(v[k], int) and not isinstance(v[k], bool) and v[k] > 0):
            raise MappingError(f"{family}: vision_config.{k} must be a positive integer, got {v[k]!r}")
    H, N = v["hidden_size"], v["num_heads"]
    if H % N:
        raise MappingError(f"{family}: vision hidden_size {H} is not a multiple of num_heads {N}")
    side = int(round(v["num_position_embeddings"] ** 0.5))
    if side * side != v["num_position_embeddings"]:
        # MaxText (and HF) read the table as a square grid of int(sqrt(n)) rows
        raise MappingError(
            f"{family}: vision num_position_embeddings={v['num_position_embeddings']} is not a square grid"
        )
    deep = [int(i) for i in v["deepstack_visual_indexes"]]
    if any(not 0 <= i < v["depth"] for i in deep):
        raise MappingError(f"{family}: deepstack_visual_indexes {deep} out of range for depth {v['depth']}")
    if text_hidden is not None and v["out_hidden_size"] != text_hidden:
        raise MappingError(
            f"{family}: vision out_hidden_size {v['out_hidden_size']} != text hidden_size {text_hidden}; the image "
            "tokens replace text embeddings"
        )
    merge = v["spatial_merge_size"]
    return {
        "layers": v["depth"],
        "hidden": H,
        "heads": N,
        "head_dim": H // N,
        "mlp": v["intermediate_size"],
        "channels": v["in_channels"],
        "patch": v["patch_size"],
        "temporal_patch": v["temporal_patch_size"],
        "merge": merge,
        "merged": H * merge * merge,
        "out": v["out_hidden_size"],
        "positions": v["num_position_embeddings"],
        "deepstack": tuple(deep),
        "hidden_act": v["hidden_act"],
        "encoder": encoder,
        "projector": projector,
    }


def _merger(hf: str, mt: str, norm: int, merged: int, out: int) -> list[Rule]:
    """One patch merger: LayerNorm (`norm` features), Linear merged -> merged, GELU, Linear merged -> out."""
    return [
        common.vector(hf + "norm.weight", mt + "ln_q/scale", norm),
        common.vector(hf + "norm.bias", mt + "ln_q/bias", norm),
        Rule(
            hf + "linear_fc1.weight",
            mt + "mlp_0/kernel",
            hf_shape=(merged, merged),
            mt_shape=(merged, merged),
            chain=(Kernel((merged, merged)),),
        ),
        common.vector(hf + "linear_fc1.bias", mt + "mlp_0/bias", merged),
        Rule(
            hf + "linear_fc2.weight",
            mt + "mlp_2/kernel",
            hf_shape=(out, merged),
            mt_shape=(merged, out),
            chain=(Kernel((merged, out)),),
        ),
        common.vector(hf + "linear_fc2.bias", mt + "mlp_2/bias", out),
    ]


def vision_rules(v: dict) -> list[Rule]:
    """The tower's arrays outside its blocks: patch embedding, position table, deepstack mergers, projector."""
    H, C, P, T = v["hidden"], v["channels"], v["patch"], v["temporal_patch"]
    enc, proj = v["encoder"], v["projector"]
    rules = [
        Rule(
            HF + "patch_embed.proj.weight",
            f"{enc}/patch_embed/proj/kernel",
            hf_shape=(H, C, T, P, P),
            mt_shape=(T, P, P, C, H),
            chain=(Permute((2, 3, 4, 1, 0)),),  # torch Conv3d [out, in, t, h, w] -> flax [t, h, w, in, out]
        ),
        common.vector(HF + "patch_embed.proj.bias", f"{enc}/patch_embed/proj/bias", H),
        Rule(
            HF + "pos_embed.weight",
            f"{enc}/pos_embed_interpolate/pos_embed",
            hf_shape=(v["positions"], H),
            mt_shape=(v["positions"], H),
        ),
    ]
    for k in range(len(v["deepstack"])):  # post-shuffle norm: LayerNorm over the 4H merged features
        rules += _merger(f"{HF}deepstack_merger_list.{k}.", f"{enc}/merger_{k}/", v["merged"], v["merged"], v["out"])
    rules += _merger(f"{HF}merger.", f"{proj}/merger/", H, v["merged"], v["out"])  # pre-shuffle norm over H
    return rules


def block_rules(v: dict) -> list[Rule]:
    """One vision block (`{i}`: the block index)."""
    H, N, D, F = v["hidden"], v["heads"], v["head_dim"], v["mlp"]
    b = HF + "blocks.{i}."
    a = "attn/attn/"
    qkv = tuple(f"{a}{m}/kernel" for m in ("query", "key", "value"))
    qkv_bias = tuple(f"{a}{m}/bias" for m in ("query", "key", "value"))
    return [
        common.vector(b + "norm1.weight", "ln1/scale", H),
        common.vector(b + "norm1.bias", "ln1/bias", H),
        common.vector(b + "norm2.weight", "ln2/scale", H),
        common.vector(b + "norm2.bias", "ln2/bias", H),
        # one fused [3H, H] Linear: rows q | k | v, each an [N*D, H] Linear
        Rule(
            b + "attn.qkv.weight",
            qkv,
            hf_shape=(3 * N * D, H),
            mt_shape=(H, N, D),
            chain=(Kernel((H, N, D)),),
            split=Chunks(3, axis=0),
        ),
        Rule(
            b + "attn.qkv.bias",
            qkv_bias,
            hf_shape=(3 * N * D,),
            mt_shape=(N, D),
            chain=(Reshape((N, D), (N * D,)),),
            split=Chunks(3, axis=0),
        ),
        Rule(
            b + "attn.proj.weight",
            f"{a}out/kernel",
            hf_shape=(H, N * D),
            mt_shape=(N, D, H),
            chain=(Kernel((N, D, H), n_in=2),),
        ),
        common.vector(b + "attn.proj.bias", f"{a}out/bias", H),
        Rule(b + "mlp.linear_fc1.weight", "mlp/kernel", hf_shape=(F, H), mt_shape=(H, F), chain=(Kernel((H, F)),)),
        common.vector(b + "mlp.linear_fc1.bias", "mlp/bias", F),
        Rule(b + "mlp.linear_fc2.weight", "mlp_out/kernel", hf_shape=(H, F), mt_shape=(F, H), chain=(Kernel((F, H)),)),
        common.vector(b + "mlp.linear_fc2.bias", "mlp_out/bias", H),
    ]


def vision_groups(v: dict) -> list[LayerGroup]:
    """The blocks, never scanned: `blocks_<i>` (MaxText sets them as attributes one by one)."""
    n, e = v["layers"], v["encoder"]
    return [LayerGroup(tuple(block_rules(v)), tuple(range(n)), None, tuple(f"{e}/blocks_{i}" for i in range(n)))]
