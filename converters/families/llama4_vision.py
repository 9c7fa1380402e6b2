"""Llama 4's vision tower and projector (multimodal `llama4` checkpoints, Llama4ForConditionalGeneration: HF
`vision_model.*` and `multi_modal_projector.*`), as MaxText 0.2.5 lays them out with `use_multimodal=true`
(`vision_encoder_block: llama4`; models/llama4.py `Llama4VisionModel`, `Llama4MultiModalProjector`, built by
layers/encoders.py `VisionEncoder`). Never scanned: MaxText sets the encoder layers one by one (`layers_<i>`)
whatever `scan_layers` is.

What MaxText lays out (its abstract tree, nnx.eval_shape of llama4-17b-16e / -128e, 554 arrays), under
`vision_encoder/Llama4VisionModel_0/`:
  * `Llama4UnfoldConvolution_0/vit_unfold_linear/kernel` `[C*P*P, H]`: HF's `patch_embedding.linear.weight`
    `[H, C*P*P]` transposed. Both unfold the image the same way (torch `nn.Unfold` and
    `lax.conv_general_dilated_patches`: channel slowest, then patch row, then column), so no permutation;
  * `class_embedding` `[H]` and `positional_embedding_vlm` `[patches + 1, H]` (the class token last): as is;
  * `layernorm_pre`, `layernorm_post` and per layer `input_layer_norm`, `post_attention_layer_norm`: LayerNorm
    `scale` / `bias` = HF `weight` / `bias`, as is;
  * `Llama4VisionEncoder_0/layers_<i>/self_attention_vision/{query,key,value}/kernel` `[H, N, D]` and `/bias`
    `[N, D]`, `out/kernel` `[N, D, H]`, `out/bias` `[H]` (HF `model.layers.<i>.self_attn.{q,k,v,o}_proj`). The 2-D
    RoPE (embeddings.py `LlamaVisionRotaryEmbedding`) rotates the same adjacent pairs (2i, 2i+1) as HF's
    `vision_apply_rotary_emb` with the same frequencies, and the query scale head_dim**-0.5 is applied at run time,
    so nothing is permuted or scaled;
  * `.../Llama4VisionMLP_0/vit_encoder_layer_mlp_fc1|fc2/kernel|bias` (HF `mlp.fc1|fc2`): kernels transposed;
  * `Llama4VisionPixelShuffleMLP_0/pixel_shuffle_mlp/vit_pixel_shuffle_mlp_fc1|fc2/kernel` (HF
    `vision_adapter.mlp.fc1|fc2.weight`, no biases), transposed;
and `vision_encoder/Llama4MultiModalProjector_0/vit_multi_modal_projector/kernel` `[vision_output_dim, text hidden]`
(HF `multi_modal_projector.linear_1.weight`, no bias), transposed.
Every tensor is moved only: round trips are bit-exact.

Refused (no MaxText layout, or a tower transformers cannot run either): hidden_size not a multiple of heads (or a
head_dim whose half is odd: the 2-D RoPE splits each half in pairs), a projector bias, an adapter whose fc1 input
(intermediate_size) is not the pixel-shuffled width hidden_size / pixel_shuffle_ratio**2, projector_input_dim !=
projector_output_dim (HF's adapter fc2 is [out, out], MaxText's [in, out]), vision_output_dim !=
projector_output_dim (the projector reads the adapter's output).

MaxText reads the dimensions from its config (`*_for_vit`: hidden, intermediate, layers, heads, channels, patch,
image and `tile_size_for_vit` (the position table: tile_size = image_size), pixel_shuffle_ratio, projector dims,
vision_output_dim, rope_theta). Its LayerNorms take `normalization_layer_epsilon` (the text model's rms_norm_eps),
HF's the LayerNorm default 1e-5: equal for the published models.
"""

from __future__ import annotations

from converters.core.mapping import LayerGroup, Rule
from converters.core.transforms import Kernel, Reshape
from converters.errors import MappingError
from converters.families import common

MODEL = "vision_encoder/Llama4VisionModel_0"
ENCODER = f"{MODEL}/Llama4VisionEncoder_0"
PROJECTOR = "vision_encoder/Llama4MultiModalProjector_0"
HF = "vision_model."

# transformers' Llama4VisionConfig defaults, for keys a config leaves out
VISION_DEFAULTS = {
    "hidden_size": 768,
    "num_hidden_layers": 34,
    "num_attention_heads": 16,
    "num_channels": 3,
    "intermediate_size": 5632,
    "vision_output_dim": 7680,
    "image_size": 448,
    "patch_size": 14,
    "pixel_shuffle_ratio": 0.5,
    "projector_input_dim": 4096,
    "projector_output_dim": 4096,
    "multi_modal_projector_bias": False,
}


def vision_dims(vision_config: dict | None, text_hidden: int) -> dict:
    """The tower's sizes from HF's `vision_config` (transformers' defaults for what it leaves out), refusing what
    MaxText's tower cannot hold."""
    v = {k: (vision_config or {}).get(k, default) for k, default in VISION_DEFAULTS.items()}
    for k in (k for k in VISION_DEFAULTS if k not in ("pixel_shuffle_ratio", "multi_modal_projector_bias")):
        if not (isinstance(v[k], int) and not isinstance(v[k], bool) and v[k] > 0):
            raise MappingError(f"llama4: vision_config.{k} must be a positive integer, got {v[k]!r}")
    H, N, r = v["hidden_size"], v["num_attention_heads"], float(v["pixel_shuffle_ratio"])
    refuse = [
        (H % N or (H // N) % 4, f"hidden_size {H} / {N} heads: not a head_dim that is a multiple of 4 (2-D RoPE)"),
        (v["multi_modal_projector_bias"], "a projector bias (MaxText's projector has none)"),
        (
            not 0 < r <= 1 or H / (r * r) != v["intermediate_size"],
            f"intermediate_size {v['intermediate_size']} != hidden_size / pixel_shuffle_ratio**2 (the pixel-shuffled "
            "width the adapter reads)",
        ),
        (
            v["projector_input_dim"] != v["projector_output_dim"],
            "projector_input_dim != projector_output_dim (HF's adapter fc2 is [out, out], MaxText's [in, out])",
        ),
        (
            v["vision_output_dim"] != v["projector_output_dim"],
            "vision_output_dim != projector_output_dim (the projector reads the adapter's output)",
        ),
    ]
    for bad, what in refuse:
        if bad:
            raise MappingError(f"llama4: vision_config with {what}")
    side = v["image_size"] // v["patch_size"]
    return {
        "hidden": H,
        "heads": N,
        "head_dim": H // N,
        "mlp": v["intermediate_size"],
        "layers": v["num_hidden_layers"],
        "patch_in": v["num_channels"] * v["patch_size"] ** 2,
        "positions": side * side + 1,  # the patches and the class token
        "adapter": v["projector_input_dim"],
        "out": v["vision_output_dim"],
        "text": text_hidden,
    }


def _linear(hf: str, mt: str, n_in: int, n_out: int) -> Rule:
    """An nn.Linear weight `[out, in]` <-> a DenseGeneral kernel `[in, out]`."""
    return Rule(hf, mt, hf_shape=(n_out, n_in), mt_shape=(n_in, n_out), chain=(Kernel((n_in, n_out)),))


def global_rules(v: dict) -> list[Rule]:
    """The tower's arrays outside its layers, the adapter and the projector."""
    H, A = v["hidden"], v["adapter"]
    s = f"{MODEL}/Llama4VisionPixelShuffleMLP_0/pixel_shuffle_mlp/"
    return [
        _linear(
            HF + "patch_embedding.linear.weight",
            f"{MODEL}/Llama4UnfoldConvolution_0/vit_unfold_linear/kernel",
            v["patch_in"],
            H,
        ),
        common.vector(HF + "class_embedding", f"{MODEL}/class_embedding", H),
        Rule(
            HF + "positional_embedding_vlm",
            f"{MODEL}/positional_embedding_vlm",
            hf_shape=(v["positions"], H),
            mt_shape=(v["positions"], H),
        ),
        *(
            common.vector(f"{HF}{n}.{w}", f"{MODEL}/{n}/{m}", H)
            for n in ("layernorm_pre", "layernorm_post")
            for w, m in (("weight", "scale"), ("bias", "bias"))
        ),
        _linear(HF + "vision_adapter.mlp.fc1.weight", s + "vit_pixel_shuffle_mlp_fc1/kernel", v["mlp"], A),
        _linear(HF + "vision_adapter.mlp.fc2.weight", s + "vit_pixel_shuffle_mlp_fc2/kernel", A, v["out"]),
        _linear(
            "multi_modal_projector.linear_1.weight",
            f"{PROJECTOR}/vit_multi_modal_projector/kernel",
            v["out"],
            v["text"],
        ),
    ]


def layer_rules(v: dict) -> list[Rule]:
    """One encoder layer (HF `vision_model.model.layers.{i}.`, MaxText `.../Llama4VisionEncoder_0/layers_<i>/`)."""
    H, N, D, F = v["hidden"], v["heads"], v["head_dim"], v["mlp"]
    b = HF + "model.layers.{i}."
    a = "self_attention_vision/"
    rules = [
        common.vector(b + f"{n}.{w}", f"{m}/{mw}", H)
        for n, m in (("input_layernorm", "input_layer_norm"), ("post_attention_layernorm", "post_attention_layer_norm"))
        for w, mw in (("weight", "scale"), ("bias", "bias"))
    ]
    for hf, mt in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        rules += [
            Rule(
                b + f"self_attn.{hf}.weight",
                f"{a}{mt}/kernel",
                hf_shape=(N * D, H),
                mt_shape=(H, N, D),
                chain=(Kernel((H, N, D)),),
            ),
            Rule(
                b + f"self_attn.{hf}.bias",
                f"{a}{mt}/bias",
                hf_shape=(N * D,),
                mt_shape=(N, D),
                chain=(Reshape((N, D), (N * D,)),),
            ),
        ]
    m = "Llama4VisionMLP_0/vit_encoder_layer_mlp_"
    return [
        *rules,
        Rule(
            b + "self_attn.o_proj.weight",
            f"{a}out/kernel",
            hf_shape=(H, N * D),
            mt_shape=(N, D, H),
            chain=(Kernel((N, D, H), n_in=2),),
        ),
        common.vector(b + "self_attn.o_proj.bias", f"{a}out/bias", H),
        _linear(b + "mlp.fc1.weight", m + "fc1/kernel", H, F),
        common.vector(b + "mlp.fc1.bias", m + "fc1/bias", F),
        _linear(b + "mlp.fc2.weight", m + "fc2/kernel", F, H),
        common.vector(b + "mlp.fc2.bias", m + "fc2/bias", H),
    ]


def layer_groups(v: dict) -> list[LayerGroup]:
    """The encoder layers, never scanned."""
    n = v["layers"]
    return [LayerGroup(tuple(layer_rules(v)), tuple(range(n)), None, tuple(f"{ENCODER}/layers_{i}" for i in range(n)))]


# tiny test tower: head_dim 16 (4 rotary frequencies per axis), 56px images of 14px patches (4 x 4 + class token),
# pixel shuffle 0.5 -> 2 x 2 tokens of 4 x 32 = 128 features (the adapter's input, = intermediate_size)
TINY_VISION = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "image_size": 56,
    "patch_size": 14,
    "vision_output_dim": 48,
    "projector_input_dim": 48,
    "projector_output_dim": 48,
}
