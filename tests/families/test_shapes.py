"""Real-size models, shapes only: every MaxText model name plans exactly MaxText's tree (no weights)."""

from __future__ import annotations

import math

import pytest

from converters.core import registry

# Shapes from MaxText's layout for each model (scanned: layer axis at position 1).
EXPECTED = {
    "llama3.1-8b": {
        "token_embedder/embedding": (128256, 4096),
        "decoder/logits_dense/kernel": (4096, 128256),
        "decoder/layers/self_attention/query/kernel": (4096, 32, 32, 128),
        "decoder/layers/self_attention/key/kernel": (4096, 32, 8, 128),
        "decoder/layers/self_attention/out/kernel": (32, 32, 128, 4096),
        "decoder/layers/mlp/wi_0/kernel": (4096, 32, 14336),
        "decoder/layers/mlp/wo/kernel": (14336, 32, 4096),
        "decoder/layers/pre_self_attention_layer_norm/scale": (4096, 32),
    },
    # all 12 arrays: nnx.eval_shape of MaxText 0.2.5's model for model_name=mistral-7b gives exactly these
    "mistral-7b": {
        "token_embedder/embedding": (32000, 4096),
        "decoder/decoder_norm/scale": (4096,),
        "decoder/logits_dense/kernel": (4096, 32000),
        "decoder/layers/pre_self_attention_layer_norm/scale": (4096, 32),
        "decoder/layers/post_self_attention_layer_norm/scale": (4096, 32),
        "decoder/layers/self_attention/query/kernel": (4096, 32, 32, 128),
        "decoder/layers/self_attention/key/kernel": (4096, 32, 8, 128),
        "decoder/layers/self_attention/value/kernel": (4096, 32, 8, 128),
        "decoder/layers/self_attention/out/kernel": (32, 32, 128, 4096),
        "decoder/layers/mlp/wi_0/kernel": (4096, 32, 14336),
        "decoder/layers/mlp/wi_1/kernel": (4096, 32, 14336),
        "decoder/layers/mlp/wo/kernel": (14336, 32, 4096),
    },
    "qwen2.5-7b": {
        "token_embedder/embedding": (152064, 3584),
        "decoder/logits_dense/kernel": (3584, 152064),
        "decoder/layers/self_attention/query/kernel": (3584, 28, 28, 128),
        "decoder/layers/self_attention/query/bias": (28, 28, 128),
        "decoder/layers/self_attention/key/bias": (4, 28, 128),
        "decoder/layers/self_attention/out/kernel": (28, 28, 128, 3584),
        "decoder/layers/mlp/wi_1/kernel": (3584, 28, 18944),
    },
    "qwen3-8b": {
        "decoder/layers/self_attention/query/kernel": (4096, 36, 32, 128),
        "decoder/layers/self_attention/query_norm/scale": (128, 36),
        "decoder/logits_dense/kernel": (4096, 151936),
    },
    "qwen3-0.6b": {
        "decoder/layers/self_attention/query/kernel": (1024, 28, 16, 128),
        "decoder/layers/self_attention/out/kernel": (16, 28, 128, 1024),
    },
    # MoE (as MaxText's src/maxtext/checkpoint_conversion/standalone_scripts/convert_qwen3_moe.py stacks them): expert
    # axis 0, scanned layer axis 1
    "qwen3-30b-a3b": {
        "token_embedder/embedding": (151936, 2048),
        "decoder/logits_dense/kernel": (2048, 151936),
        "decoder/layers/self_attention/query/kernel": (2048, 48, 32, 128),
        "decoder/layers/self_attention/key/kernel": (2048, 48, 4, 128),
        "decoder/layers/self_attention/out/kernel": (32, 48, 128, 2048),
        "decoder/layers/self_attention/query_norm/scale": (128, 48),
        "decoder/layers/moe_block/gate/kernel": (2048, 48, 128),
        "decoder/layers/moe_block/wi_0": (128, 48, 2048, 768),
        "decoder/layers/moe_block/wi_1": (128, 48, 2048, 768),
        "decoder/layers/moe_block/wo": (128, 48, 768, 2048),
    },
    "qwen3-235b-a22b": {
        "decoder/layers/self_attention/query/kernel": (4096, 94, 64, 128),
        "decoder/layers/moe_block/wi_0": (128, 94, 4096, 1536),
        "decoder/layers/moe_block/wo": (128, 94, 1536, 4096),
    },
    "qwen3-480b-a35b": {
        "decoder/layers/self_attention/query/kernel": (6144, 62, 96, 128),
        "decoder/layers/self_attention/out/kernel": (96, 62, 128, 6144),
        "decoder/layers/moe_block/gate/kernel": (6144, 62, 160),
        "decoder/layers/moe_block/wi_0": (160, 62, 6144, 2560),
        "decoder/layers/moe_block/wo": (160, 62, 2560, 6144),
    },
    "mixtral-8x7b": {
        "token_embedder/embedding": (32000, 4096),
        "decoder/layers/self_attention/query/kernel": (4096, 32, 32, 128),
        "decoder/layers/self_attention/key/kernel": (4096, 32, 8, 128),
        "decoder/layers/self_attention/out/kernel": (32, 32, 128, 4096),
        "decoder/layers/MoeBlock_0/gate/kernel": (4096, 32, 8),
        "decoder/layers/MoeBlock_0/wi_0": (8, 32, 4096, 14336),
        "decoder/layers/MoeBlock_0/wi_1": (8, 32, 4096, 14336),
        "decoder/layers/MoeBlock_0/wo": (8, 32, 14336, 4096),
    },
    "mixtral-8x22b": {
        "token_embedder/embedding": (32768, 6144),
        "decoder/layers/self_attention/query/kernel": (6144, 56, 48, 128),
        "decoder/layers/MoeBlock_0/wi_0": (8, 56, 6144, 16384),
        "decoder/layers/MoeBlock_0/wo": (8, 56, 16384, 6144),
    },
    "gpt-oss-20b": {
        "token_embedder/embedding": (201088, 2880),
        "decoder/logits_dense/kernel": (2880, 201088),
        "decoder/layers/layers_0/GptOssAttention/query/kernel": (2880, 12, 64, 64),
        "decoder/layers/layers_0/GptOssAttention/query/bias": (64, 12, 64),
        "decoder/layers/layers_1/GptOssAttention/key/kernel": (2880, 12, 8, 64),
        "decoder/layers/layers_1/GptOssAttention/key/bias": (8, 12, 64),
        "decoder/layers/layers_0/GptOssAttention/out/kernel": (64, 12, 64, 2880),
        "decoder/layers/layers_0/GptOssAttention/out/bias": (2880, 12),
        "decoder/layers/layers_1/GptOssAttention/sinks": (64, 12),
        "decoder/layers/layers_0/GptOssMlp/gate/kernel": (2880, 12, 32),
        "decoder/layers/layers_0/GptOssMlp/gate/bias": (32, 12),
        "decoder/layers/layers_0/GptOssMlp/wi_0": (32, 12, 2880, 2880),
        "decoder/layers/layers_1/GptOssMlp/wi_1": (32, 12, 2880, 2880),
        "decoder/layers/layers_0/GptOssMlp/wi_0_bias": (32, 12, 2880),
        "decoder/layers/layers_1/GptOssMlp/wi_1_bias": (32, 12, 2880),
        "decoder/layers/layers_0/GptOssMlp/wo": (32, 12, 2880, 2880),
        "decoder/layers/layers_1/GptOssMlp/wo_bias": (32, 12, 2880),
    },
    "gpt-oss-120b": {
        "decoder/layers/layers_1/GptOssMlp/wi_0": (128, 18, 2880, 2880),
        "decoder/layers/layers_0/GptOssMlp/wo": (128, 18, 2880, 2880),
        "decoder/layers/layers_0/GptOssMlp/gate/kernel": (2880, 18, 128),
    },
    # Llama 4: 4-layer scanned blocks (12 each); whole trees compared with MaxText 0.2.5's abstract model (55 / 47
    # arrays scanned, 128e 531 unscanned) in tests/families/test_llama4.py's notes; the vision tower's 554 arrays in
    # tests/families/test_llama4_vision.py
    "llama4-17b-16e": {
        "decoder/layers/layers_3/Llama4MoEBlock_0/MoeBlock_0/wi_0": (16, 12, 5120, 8192),
        "decoder/layers/layers_0/Llama4MoEBlock_0/MoeBlock_0/wo": (16, 12, 8192, 5120),
        "decoder/layers/layers_0/Llama4MoEBlock_0/MoeBlock_0/gate/kernel": (5120, 12, 16),
        "decoder/layers/layers_2/Llama4MoEBlock_0/shared_experts/wo/kernel": (8192, 12, 5120),
        "decoder/layers/layers_1/self_attention/query/kernel": (5120, 12, 40, 128),
        "decoder/layers/layers_1/self_attention/out/kernel": (40, 12, 128, 5120),
    },
    "llama4-17b-128e": {
        "decoder/layers/layers_0/mlp/wi_0/kernel": (5120, 12, 16384),
        "decoder/layers/layers_2/mlp/wo/kernel": (16384, 12, 5120),
        "decoder/layers/layers_1/Llama4MoEBlock_0/MoeBlock_0/wi_1": (128, 12, 5120, 8192),
        "decoder/layers/layers_3/Llama4MoEBlock_0/shared_experts/wi_0/kernel": (5120, 12, 8192),
        "decoder/layers/layers_3/Llama4MoEBlock_0/MoeBlock_0/gate/kernel": (5120, 12, 128),
    },
    # DeepSeek-V4: the 3 hash-routed layers unscanned in both layouts, then 20 blocks [HCA, CSA]; MaxText 0.2.5's whole
    # abstract tree (220 arrays scanned, 1930 unscanned) is what the plan gives, shapes and collections alike
    # (tests/families/test_deepseek4.py's notes); `gate/bias` (MoEBiasVar) stacks its layer axis first
    "deepseek4-284b": {
        "decoder/layers_0/mlp/MoeBlock_0/tid2eid": (129280, 6),
        "decoder/layers_2/self_attention/csa_compressor/position_bias": (4, 1024),
        "decoder/layers_2/self_attention/csa_compressor/indexer/q_proj/kernel": (1024, 8192),
        "decoder/scanned_blocks/layers_0/self_attention/hca_compressor/position_bias": (128, 20, 512),
        "decoder/scanned_blocks/layers_1/self_attention/o_a_proj/kernel": (8, 20, 4096, 1024),
        "decoder/scanned_blocks/layers_1/self_attention/wq_b/kernel": (1024, 20, 64, 512),
        "decoder/scanned_blocks/layers_0/mlp/MoeBlock_0/wi_0": (256, 20, 4096, 2048),
        "decoder/scanned_blocks/layers_0/mlp/MoeBlock_0/gate/bias": (20, 256),
        "decoder/scanned_blocks/layers_1/mhc_attention/res_alpha": (16384, 20, 16),
        "decoder/scanned_blocks/layers_1/mhc_mlp/res_beta": (4, 20, 4),
        "decoder/scanned_blocks/layers_1/mhc_mlp/mhc_norm/scale": (16384, 20),
        "decoder/hc_head/hc_fn": (16384, 4),
    },
    # Gemma2: one scanned layer per (local, global) pair of HF layers; vocab padded 256000 -> 256128
    "gemma2-2b": {
        "token_embedder/embedding": (256128, 2304),
        "decoder/decoder_norm/scale": (2304,),
        "decoder/layers/pre_self_attention_norm_local/scale": (2304, 13),
        "decoder/layers/post_ffw_norm_global/scale": (2304, 13),
        "decoder/layers/self_attention_local/query/kernel": (2304, 13, 8, 256),
        "decoder/layers/self_attention_global/key/kernel": (2304, 13, 4, 256),
        "decoder/layers/self_attention_global/out/kernel": (8, 13, 256, 2304),
        "decoder/layers/mlp_local/wi_0/kernel": (2304, 13, 9216),
        "decoder/layers/mlp_global/wo/kernel": (9216, 13, 2304),
    },
    "gemma2-9b": {
        "decoder/layers/self_attention_local/query/kernel": (3584, 21, 16, 256),
        "token_embedder/embedding": (256128, 3584),
    },
    "gemma2-27b": {
        "decoder/layers/self_attention_global/query/kernel": (4608, 23, 32, 128),
        "decoder/layers/mlp_local/wi_1/kernel": (4608, 23, 36864),
    },
    # Gemma3: 6-layer scanned blocks + unscanned remainder; MaxText holds 262144 of HF's 262208 rows
    "gemma3-4b": {
        "token_embedder/embedding": (262144, 2560),
        "decoder/layers/layers_0/self_attention/query/kernel": (2560, 5, 8, 256),
        "decoder/layers/layers_5/self_attention/key/kernel": (2560, 5, 4, 256),
        "decoder/layers/layers_3/self_attention/out/kernel": (8, 5, 256, 2560),
        "decoder/layers/layers_2/self_attention/query_norm/scale": (256, 5),
        "decoder/layers/layers_1/pre_ffw_norm/scale": (2560, 5),
        "decoder/layers/layers_4/mlp/wo/kernel": (10240, 5, 2560),
        "decoder/layers_remainder/layers_3/self_attention/query/kernel": (2560, 8, 256),
        "decoder/layers_remainder/layers_0/mlp/wi_0/kernel": (2560, 10240),
        "vision_encoder/Gemma3VisionEncoderLayer_0/embedding/kernel": (14, 14, 3, 1152),
        "vision_encoder/Gemma3VisionEncoderLayer_0/pos_embedding": (1, 4096, 1152),
        "vision_encoder/Gemma3VisionEncoderLayer_0/Transformer/encoderblock_26/MultiHeadDotProductAttention_0/query/kernel": (  # noqa: E501 (MaxText's path)
            1152,
            16,
            72,
        ),
        "vision_encoder/Gemma3VisionEncoderLayer_0/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel": (  # noqa: E501 (MaxText's path)
            16,
            72,
            1152,
        ),
        "vision_encoder/Gemma3VisionEncoderLayer_0/Transformer/encoderblock_3/MlpBlockViT_0/Dense_0/kernel": (
            1152,
            4304,
        ),
        "vision_encoder/VisionEmbedder_0/mm_input_projection/w": (1152, 2560),
        "vision_encoder/VisionEmbedder_0/mm_soft_embedding_norm/scale": (1152,),
    },
    # DeepSeek: dense and MoE layers in two stacks, `dense_layers` and `moe_layers` (as MaxText's
    # src/maxtext/checkpoint_conversion/standalone_scripts/convert_deepseek_family_ckpt.py writes them)
    "deepseek2-16b": {
        "token_embedder/embedding": (102400, 2048),
        "decoder/dense_layers/self_attention/query/kernel": (2048, 1, 16, 192),
        "decoder/dense_layers/mlp/wi_0/kernel": (2048, 1, 10944),
        "decoder/moe_layers/self_attention/wkv_a/kernel": (2048, 26, 576),
        "decoder/moe_layers/self_attention/wkv_b/kernel": (512, 26, 16, 256),
        "decoder/moe_layers/self_attention/out/kernel": (16, 26, 128, 2048),
        "decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/gate/kernel": (2048, 26, 64),
        "decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/wi_0": (64, 26, 2048, 1408),
        "decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/wo": (64, 26, 1408, 2048),
        "decoder/moe_layers/DeepSeekMoeBlock_0/shared_experts/wi_1/kernel": (2048, 26, 2816),
    },
    "deepseek3-671b": {
        "token_embedder/embedding": (129280, 7168),
        "decoder/logits_dense/kernel": (7168, 129280),
        "decoder/dense_layers/self_attention/wq_a/kernel": (7168, 3, 1536),
        "decoder/dense_layers/self_attention/q_norm/scale": (1536, 3),
        "decoder/dense_layers/mlp/wo/kernel": (18432, 3, 7168),
        "decoder/moe_layers/self_attention/wq_b/kernel": (1536, 58, 128, 192),
        "decoder/moe_layers/self_attention/kv_norm/scale": (512, 58),
        "decoder/moe_layers/self_attention/out/kernel": (128, 58, 128, 7168),
        "decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/gate/bias": (256, 58),
        "decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/wi_1": (256, 58, 7168, 2048),
        "decoder/moe_layers/DeepSeekMoeBlock_0/shared_experts/wo/kernel": (2048, 58, 7168),
    },
    # Kimi-K2: DeepSeek-V3's layout, 1 dense + 60 MoE layers of 384 experts; 31 of the 32 scanned arrays (all 1035
    # unscanned) equal nnx.eval_shape of MaxText 0.2.5's kimi-k2-1t. The scanned gate/bias is (60, 384) there: as
    # for deepseek3-671b, ckptflow stacks it (384, 60) (layer axis at 1) -- see the note at SPLIT_STACKS
    "kimi-k2-1t": {
        "token_embedder/embedding": (163840, 7168),
        "decoder/logits_dense/kernel": (7168, 163840),
        "decoder/dense_layers/self_attention/wq_b/kernel": (1536, 1, 64, 192),
        "decoder/dense_layers/self_attention/wkv_b/kernel": (512, 1, 64, 256),
        "decoder/dense_layers/mlp/wi_0/kernel": (7168, 1, 18432),
        "decoder/moe_layers/self_attention/out/kernel": (64, 60, 128, 7168),
        "decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/gate/kernel": (7168, 60, 384),
        "decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/wi_0": (384, 60, 7168, 2048),
        "decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/wo": (384, 60, 2048, 7168),
        "decoder/moe_layers/DeepSeekMoeBlock_0/shared_experts/wi_1/kernel": (7168, 60, 2048),
    },
    "deepseek3.2-671b": {
        "decoder/dense_layers/self_attention/indexer/wq_b/kernel": (1536, 3, 64, 128),
        "decoder/moe_layers/self_attention/indexer/wk/kernel": (7168, 58, 128),
        "decoder/moe_layers/self_attention/indexer/k_norm/scale": (128, 58),
        "decoder/moe_layers/self_attention/indexer/k_norm/bias": (128, 58),
        "decoder/moe_layers/self_attention/indexer/weights_proj/kernel": (7168, 58, 64),
        "decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/wo": (256, 58, 2048, 7168),
    },
    # Qwen3-Next, all 36 arrays (= nnx.eval_shape of MaxText 0.2.5's model): one scanned block per 4-layer cycle
    # (src/maxtext/models/qwen3.py Qwen3NextScannableBlock), its 3 gated-delta-net layers nested as
    # local_layers [.., 12 blocks, 3, ..], its full-attention layer as global_layer [.., 12 blocks, ..]
    "qwen3-next-80b-a3b": {
        "decoder/decoder_norm/scale": (2048,),
        "decoder/layers/global_layer/attention/attention/key/kernel": (2048, 12, 2, 256),
        "decoder/layers/global_layer/attention/attention/key_norm/scale": (256, 12),
        "decoder/layers/global_layer/attention/attention/out/kernel": (4096, 12, 2048),
        "decoder/layers/global_layer/attention/attention/query/kernel": (2048, 12, 16, 512),
        "decoder/layers/global_layer/attention/attention/query_norm/scale": (256, 12),
        "decoder/layers/global_layer/attention/attention/value/kernel": (2048, 12, 2, 256),
        "decoder/layers/global_layer/input_layernorm/scale": (2048, 12),
        "decoder/layers/global_layer/mlp/routed_experts/gate/kernel": (2048, 12, 512),
        "decoder/layers/global_layer/mlp/routed_experts/wi_0": (512, 12, 2048, 512),
        "decoder/layers/global_layer/mlp/routed_experts/wi_1": (512, 12, 2048, 512),
        "decoder/layers/global_layer/mlp/routed_experts/wo": (512, 12, 512, 2048),
        "decoder/layers/global_layer/mlp/shared_expert/wi_0/kernel": (2048, 12, 512),
        "decoder/layers/global_layer/mlp/shared_expert/wi_1/kernel": (2048, 12, 512),
        "decoder/layers/global_layer/mlp/shared_expert/wo/kernel": (512, 12, 2048),
        "decoder/layers/global_layer/mlp/shared_expert_gate/kernel": (2048, 12, 1),
        "decoder/layers/global_layer/post_attention_layernorm/scale": (2048, 12),
        "decoder/layers/local_layers/attention/A_log": (32, 12, 3),
        "decoder/layers/local_layers/attention/conv1d/kernel": (4, 12, 3, 1, 8192),
        "decoder/layers/local_layers/attention/dt_bias": (32, 12, 3),
        "decoder/layers/local_layers/attention/in_proj_ba/kernel": (2048, 12, 3, 64),
        "decoder/layers/local_layers/attention/in_proj_qkvz/kernel": (2048, 12, 3, 12288),
        "decoder/layers/local_layers/attention/norm/rms_norm/scale": (128, 12, 3),
        "decoder/layers/local_layers/attention/out_proj/kernel": (4096, 12, 3, 2048),
        "decoder/layers/local_layers/input_layernorm/scale": (2048, 12, 3),
        "decoder/layers/local_layers/mlp/routed_experts/gate/kernel": (2048, 12, 3, 512),
        "decoder/layers/local_layers/mlp/routed_experts/wi_0": (512, 12, 3, 2048, 512),
        "decoder/layers/local_layers/mlp/routed_experts/wi_1": (512, 12, 3, 2048, 512),
        "decoder/layers/local_layers/mlp/routed_experts/wo": (512, 12, 3, 512, 2048),
        "decoder/layers/local_layers/mlp/shared_expert/wi_0/kernel": (2048, 12, 3, 512),
        "decoder/layers/local_layers/mlp/shared_expert/wi_1/kernel": (2048, 12, 3, 512),
        "decoder/layers/local_layers/mlp/shared_expert/wo/kernel": (512, 12, 3, 2048),
        "decoder/layers/local_layers/mlp/shared_expert_gate/kernel": (2048, 12, 3, 1),
        "decoder/layers/local_layers/post_attention_layernorm/scale": (2048, 12, 3),
        "decoder/logits_dense/kernel": (2048, 151936),
        "token_embedder/embedding": (151936, 2048),
    },
    "gemma3-12b": {
        "decoder/layers/layers_5/self_attention/query/kernel": (3840, 8, 16, 256),
        "token_embedder/embedding": (262144, 3840),
    },
    "gemma3-27b": {
        "decoder/layers/layers_0/self_attention/query/kernel": (5376, 10, 32, 128),
        "decoder/layers_remainder/layers_1/self_attention/out/kernel": (32, 128, 5376),
        "vision_encoder/VisionEmbedder_0/mm_input_projection/w": (1152, 5376),
    },
}


def _olmo3(emb: int, heads: int, kv: int, mlp: int, layers: int, vocab: int = 100278, head_dim: int = 128) -> dict:
    """Every array of MaxText's olmo3 tree: 4 stacks `decoder/layers/layers_<b>` of layers / 4 entries (attention
    module `attention`, q/k norms over heads * head_dim)."""
    n = layers // 4
    layer = {
        "attention/query/kernel": (emb, n, heads, head_dim),
        "attention/key/kernel": (emb, n, kv, head_dim),
        "attention/value/kernel": (emb, n, kv, head_dim),
        "attention/out/kernel": (heads, n, head_dim, emb),
        "attention/query_norm/scale": (heads * head_dim, n),
        "attention/key_norm/scale": (kv * head_dim, n),
        "mlp/wi_0/kernel": (emb, n, mlp),
        "mlp/wi_1/kernel": (emb, n, mlp),
        "mlp/wo/kernel": (mlp, n, emb),
        "post_self_attention_layer_norm/scale": (emb, n),
        "post_mlp_layer_norm/scale": (emb, n),
    }
    return {
        "token_embedder/embedding": (vocab, emb),
        "decoder/decoder_norm/scale": (emb,),
        "decoder/logits_dense/kernel": (emb, vocab),
        **{f"decoder/layers/layers_{b}/{k}": s for b in range(4) for k, s in layer.items()},
    }


# all 47 arrays: nnx.eval_shape of MaxText 0.2.5's model for each model name gives exactly these
EXPECTED |= {
    "olmo3-7b": _olmo3(4096, 32, 32, 11008, 32),
    "olmo3-7b-pt": _olmo3(4096, 32, 32, 11008, 32),
    "olmo3-32b": _olmo3(5120, 40, 8, 27648, 64),
}


def _gemma4(e: int, blocks: int, heads: int, kv: int, global_kv: int, mlp: int, moe: tuple[int, int] = ()) -> dict:
    """Every array of MaxText 0.2.5's gemma4 tree (nnx.eval_shape): `blocks` scanned blocks of 5 local layers (nested
    [.., blocks, 5, ..]; head_dim 256) and 1 global layer ([.., blocks, ..]; head_dim 512, `global_kv` kv heads, no
    value kernel: keys are the values); tied. `moe` = (experts, expert width): every layer `Gemma4MoE`, the dense
    MLP of `mlp` its shared expert, the routed experts `[X, blocks, (5,) ..]` (the expert axis first), the router,
    its scale and per-expert scale, three extra norms."""
    out = {"decoder/decoder_norm/scale": (e,), "token_embedder/embedding": (262144, e)}
    for kind, s, k, d in (("global_layer", (blocks,), global_kv, 512), ("local_layers", (blocks, 5), kv, 256)):
        layer = {
            "layer_scalar": (1, *s),
            "self_attention/key/kernel": (e, *s, k, d),
            "self_attention/key_norm/scale": (d, *s),
            "self_attention/out/kernel": (heads, *s, d, e),
            "self_attention/query/kernel": (e, *s, heads, d),
            "self_attention/query_norm/scale": (d, *s),
        }
        norms = ("pre_self_attention_norm", "post_self_attention_norm", "pre_ffw_norm", "post_ffw_norm")
        layer |= {f"{n}/scale": (e, *s) for n in norms}
        if kind == "local_layers":
            layer["self_attention/value/kernel"] = (e, *s, k, d)
        dense = "mlp/moe_block/shared_experts/" if moe else "mlp/"
        layer |= {f"{dense}{m}/kernel": (e, *s, mlp) for m in ("wi_0", "wi_1")} | {f"{dense}wo/kernel": (mlp, *s, e)}
        if moe:
            x, f, r = *moe, "mlp/moe_block/MoeBlock_0/"
            layer |= {r + "gate/kernel": (e, *s, x), r + "per_expert_scale": (x, *s), r + "wo": (x, *s, f, e)}
            layer |= {r + m: (x, *s, e, f) for m in ("wi_0", "wi_1")}
            norms = ("post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2")
            layer |= {f"mlp/{n}/scale": (e, *s) for n in norms} | {"mlp/pre_forward_scale_2": (e, *s)}
        out |= {f"decoder/scanned_blocks/{kind}/{key}": shape for key, shape in layer.items()}
    return out


EXPECTED |= {
    "gemma4-31b": _gemma4(5376, 10, 32, 16, 4, 21504),  # 29 arrays
    "gemma4-26b": _gemma4(2816, 5, 16, 8, 2, 2112, moe=(128, 704)),  # 47 arrays: 128 experts of 704
}


def _gemma4_small(e: int, kv: int, mlp: int, ple_width: int, layers: tuple[int, int, int, int]) -> dict:
    """MaxText 0.2.5's gemma4_small tree (nnx.eval_shape, scan_layers=false; no scanned tree exists): the per-layer
    embedder and one layer of each kind, `layers` = (local, global, shared local, shared global); shared layers have
    no key / value / key_norm and, on e2b, twice the MLP."""
    local, glob, shared_local, shared_glob = (f"decoder/layers_{i}/" for i in layers)
    wide = 2 * mlp if e == 1536 else mlp
    out = {
        "token_embedder/embedding": (262144, e),
        "decoder/decoder_norm/scale": (e,),
        "decoder/per_layer_embedder/embed_tokens_per_layer": (262144, ple_width),
        "decoder/per_layer_embedder/per_layer_model_projection/kernel": (e, ple_width),
        "decoder/per_layer_embedder/per_layer_projection_norm/scale": (256,),
    }
    for prefix, d, f, shared in (
        (local, 256, mlp, False),
        (glob, 512, mlp, False),
        (shared_local, 256, wide, True),
        (shared_glob, 512, wide, True),
    ):
        out |= {
            prefix + "mlp/wi_0/kernel": (e, f),
            prefix + "mlp/wo/kernel": (f, e),
            prefix + "per_layer_input_gate/kernel": (e, 256),
            prefix + "per_layer_projection/kernel": (256, e),
            prefix + "post_per_layer_input_norm/scale": (e,),
            prefix + "layer_scalar": (1,),
            prefix + "self_attention/query/kernel": (e, 8, d),
            prefix + "self_attention/query_norm/scale": (d,),
            prefix + "self_attention/out/kernel": (8, d, e),
        }
        if not shared:
            out |= {
                prefix + "self_attention/key/kernel": (e, kv, d),
                prefix + "self_attention/value/kernel": (e, kv, d),
                prefix + "self_attention/key_norm/scale": (d,),
            }
    return out


EXPECTED |= {
    "gemma4-e2b": _gemma4_small(1536, 1, 6144, 35 * 256, (0, 4, 15, 34)),
    "gemma4-e4b": _gemma4_small(2560, 2, 10240, 42 * 256, (0, 5, 24, 41)),
}
# MaxText builds these only unscanned (nnx_decoders.py, configs/types.py refuse scan_layers=true)
UNSCANNED_ONLY = {"gemma4-e2b", "gemma4-e4b"}
# DeepSeek-V4: layers 0-2 unscanned in both layouts; layer 3 (HCA) and 4 (CSA) are the first of each block stack
SCANNED_BLOCKS = {
    "deepseek4-284b": {
        "decoder/layers_3/": "decoder/scanned_blocks/layers_0/",
        "decoder/layers_4/": "decoder/scanned_blocks/layers_1/",
    }
}
PARAMS_B = {
    "qwen3-vl-2b": 2.13,  # Qwen3-VL: MaxText's use_multimodal=true tree, vision tower included
    "qwen3-vl-4b": 4.44,
    "qwen3-vl-30b-a3b": 31.07,
    "llama3.1-8b": 8.03,
    "llama3.1-70b": 70.55,
    "llama3.1-405b": 405.85,
    "mistral-7b": 7.24,
    "qwen2.5-1.5b": 1.54,
    "qwen2.5-7b": 7.62,
    "qwen2.5-14b": 14.77,
    "qwen3-0.6b": 0.60,
    "qwen3-1.7b": 1.72,
    "qwen3-4b": 4.02,
    "qwen3-8b": 8.19,
    "qwen3-14b": 14.77,
    "qwen3-32b": 32.76,
    # MoE totals as published: 30.5B, 235B, 480B; 46.7B, 141B; 21B, 117B
    "qwen3-30b-a3b": 30.53,
    "qwen3-235b-a22b": 235.09,
    "qwen3-480b-a35b": 480.15,
    "mixtral-8x7b": 46.70,
    "mixtral-8x22b": 140.63,
    "gpt-oss-20b": 20.91,
    "gpt-oss-120b": 116.83,
    "llama4-17b-16e": 108.64,  # MaxText's use_multimodal=true tree: 0.87 B of it the vision tower
    "llama4-17b-128e": 401.58,
    # MaxText's arrays: Gemma2 with 128 padded vocab rows, Gemma3 without 64 rows and with the 0.42B vision tower
    # DeepSeek without the multi-token-prediction layer: V2-Lite 15.7B, V3 671B (685B with MTP)
    # (V3.2: V3 plus 0.85B of indexer)
    "deepseek2-16b": 15.71,
    "deepseek3-671b": 671.03,
    "deepseek3.2-671b": 671.88,
    "kimi-k2-1t": 1026.41,  # "1T": MaxText's tree for kimi-k2-1t holds the same 1026.41 B
    # Qwen3-Next "80B" without its mtp.* module
    "qwen3-next-80b-a3b": 79.67,
    "deepseek4-284b": 284.34,  # "284B", without the MTP layer (MaxText's tree: 284.34 B)
    "qwen3.5-35b-a3b": 35.11,  # with the 0.45 B vision tower (MaxText use_multimodal=true)
    "qwen3.5-397b-a17b": 396.80,
    "gemma2-2b": 2.61,
    "gemma2-9b": 9.24,
    "gemma2-27b": 27.23,
    "gemma3-4b": 4.30,
    "gemma3-12b": 12.19,
    "gemma3-27b": 27.43,
    "olmo3-7b": 7.30,
    "olmo3-7b-pt": 7.30,
    "olmo3-32b": 32.23,
    "gemma4-31b": 30.70,
    "gemma4-26b": 25.23,  # text model only; 22.84 B of it the 30 x 128 routed experts
    # text models only (no vision / audio towers); 2.35 B and 2.88 B of them per-layer embedding tables
    "gemma4-e2b": 4.63,
    "gemma4-e4b": 7.46,
}
TIED = {
    "qwen2.5-1.5b",
    "qwen3-0.6b",
    "qwen3-1.7b",
    "qwen3-4b",
    "gemma2-2b",
    "gemma2-9b",
    "gemma2-27b",
    "gemma3-4b",
    "gemma3-12b",
    "gemma3-27b",
    "gemma4-31b",
    "gemma4-26b",
    "gemma4-e2b",
    "gemma4-e4b",
    "qwen3-vl-2b",
    "qwen3-vl-4b",
}
# MaxText decoder layers when that is not the HF layer count: Gemma2 holds (local, global) pairs
MAXTEXT_LAYERS = {"gemma2-2b": 13, "gemma2-9b": 21, "gemma2-27b": 23}
# DeepSeek: (dense, MoE) layers, stacked as decoder/dense_layers and decoder/moe_layers (unscanned *_layers_<i>)
# (MaxText 0.2.5's abstract tree stacks DeepSeek's 1-D `gate/bias` (layers, experts) in its MoEBiasVar collection;
# ckptflow writes (experts, layers) under params for deepseek3* and kimi-k2-1t, as MaxText's standalone converter
# does: MaxText's loader transposes it, and its forward runs on it, where it fails on the (layers, experts)
# MoEBiasVar layout -- measured with bench/maxtext_logits.py on a scanned tiny deepseek3, MaxText 0.2.5)
SPLIT_STACKS = {
    "deepseek2-16b": (1, 26),
    "deepseek3-671b": (3, 58),
    "deepseek3.2-671b": (3, 58),
    "kimi-k2-1t": (1, 60),
}


@pytest.mark.parametrize("name", registry.model_names())
def test_real_size_plan(name):
    family, cfg = registry.model(name)
    unscanned = {l.path: l.shape for l in family.plan(cfg, False)}
    if name in UNSCANNED_ONLY:
        with pytest.raises(registry.UnsupportedModelError, match="scan_layers=false"):
            family.plan(cfg, True)
        for path, shape in EXPECTED[name].items():
            assert unscanned[path] == shape, path
        assert round(sum(map(math.prod, unscanned.values())) / 1e9, 2) == PARAMS_B[name]
        return
    scanned = {l.path: l.shape for l in family.plan(cfg, True)}
    for path, shape in EXPECTED.get(name, {}).items():
        assert scanned[path] == shape, path
    assert ("decoder/logits_dense/kernel" in scanned) == (name not in TIED)
    assert sum(map(math.prod, scanned.values())) == sum(map(math.prod, unscanned.values()))
    assert name in PARAMS_B, (
        f"{name}: add its parameter count (billions, in MaxText's tree) to PARAMS_B (docs/adding-a-family.md)"
    )
    assert round(sum(map(math.prod, scanned.values())) / 1e9, 2) == PARAMS_B[name]
    if name in SPLIT_STACKS:
        for group, n in zip(("dense_layers", "moe_layers"), SPLIT_STACKS[name]):
            assert any(p.startswith(f"decoder/{group}_{n - 1}/") for p in unscanned)
            assert not any(p.startswith((f"decoder/{group}/", f"decoder/{group}_{n}/")) for p in unscanned)
            for path, shape in unscanned.items():
                if path.startswith(f"decoder/{group}_0/"):
                    s = scanned[path.replace(f"{group}_0", group, 1)]
                    assert s[:1] + s[2:] == shape and s[1] == n, path
        return
    if name in SCANNED_BLOCKS:  # an unscanned prefix, then blocks: each block layer's leaf with its layer axis removed
        for unrolled, block in SCANNED_BLOCKS[name].items():
            for path, shape in unscanned.items():
                if path.startswith(unrolled):
                    s = scanned[path.replace(unrolled, block, 1)]
                    assert len(s) == len(shape) + 1 and shape in (s[:1] + s[2:], s[1:]), path
        return
    L = MAXTEXT_LAYERS.get(name) or family.dims(cfg).layers
    assert any(p.startswith(f"decoder/layers_{L - 1}/") for p in unscanned)
    assert not any(p.startswith(("decoder/layers/", f"decoder/layers_{L}/")) for p in unscanned)
    # every unscanned layer leaf is the scanned leaf with the layer axis removed (axis 1, also for [E, L, ...]
    # expert stacks); GPT-OSS scans two interleaved stacks, decoder/layers/layers_0 and layers_1; Qwen3-Next nests
    # layer 0 in decoder/layers/local_layers with two layer axes, [.., blocks, 3, ..], Gemma4 in
    # decoder/scanned_blocks/local_layers, [.., blocks, 5, ..]; Qwen3.5 in decoder/layers/layer_0, [.., blocks, ..]
    for path, shape in unscanned.items():
        if path.startswith("decoder/layers_0/"):
            s = (
                scanned.get(path.replace("layers_0", "layers", 1))
                or scanned.get(path.replace("layers_0", "layers/local_layers", 1))
                or scanned.get(path.replace("layers_0", "scanned_blocks/local_layers", 1))
                or scanned.get(path.replace("layers_0", "layers/layer_0", 1))
                or scanned[path.replace("layers_0", "layers/layers_0", 1)]
            )
            k = len(s) - len(shape)  # the stacked axes, from axis 1 on
            assert k in (1, 2) and s[:1] + s[1 + k :] == shape, path


def test_instruct_names_map_to_base_architecture():
    assert registry.model("llama3.1-8b-Instruct")[0].name == "llama3.1"


def test_unknown_model_lists_supported():
    with pytest.raises(registry.UnsupportedModelError, match="llama3.1-8b"):
        registry.model("gpt2")


def gemma4_tower(emb: int) -> dict:
    """The 356 vision_encoder arrays of MaxText 0.2.5's gemma4 tree with use_multimodal=true (nnx.eval_shape of
    gemma4-31b): 27 unscanned layers of 1152 (16 heads x 72, MLP 4304), 16px patches (768 inputs), a 10240-position
    factorized table [10240, 2, 1152], std_bias / std_scale, the projector [1152, emb]."""
    e, p = "vision_encoder/Gemma4VisionEncoderLayer_0/", "vision_encoder/Gemma4VisionProjector_0/"
    out = {
        e + "vision_entry/input_projection/kernel": (768, 1152),
        e + "vision_entry/pos_emb_param": (10240, 2, 1152),
        e + "std_bias": (1152,),
        e + "std_scale": (1152,),
        p + "projection/kernel": (1152, emb),
    }
    for i in range(27):
        b = f"{e}layer_{i}/"
        out |= {b + f"attention/{k}/kernel": (1152, 16, 72) for k in ("query", "key", "value")}
        out |= {b + "attention/out/kernel": (16, 72, 1152), b + "mlp/wo/kernel": (4304, 1152)}
        out |= {b + f"attention/{k}_norm/scale": (72,) for k in ("query", "key")}
        out |= {b + f"mlp/{k}/kernel": (1152, 4304) for k in ("wi_0", "wi_1")}
        out |= {b + f"{k}_norm/scale": (1152,) for k in ("pre_attention", "post_attention", "pre_ffw", "post_ffw")}
    return out


@pytest.mark.parametrize("name, emb, params_b", [("gemma4-31b", 5376, 31.27), ("gemma4-26b", 2816, 25.81)])
def test_gemma4_multimodal_real_size_plan_is_maxtexts_whole_tree(name, emb, params_b):
    """The published Gemma4ForConditionalGeneration layouts plan exactly MaxText 0.2.5's tree with
    use_multimodal=true, the text arrays plus the 356 of the tower: gemma4-31b 29 + 356 = 385 (31.27 B, 0.58 B of
    them the tower); google/gemma-4-26b-a4b-it (the MoE text model, 31b's tower) 47 + 356 = 403 (25.81 B)."""
    from converters.families.gemma4_vision import multimodal_config

    family, text = registry.model(name)
    cfg = multimodal_config(text)
    assert registry.family_for_config(cfg) is family
    scanned = {l.path: l.shape for l in family.plan(cfg, True)}
    assert scanned == EXPECTED[name] | gemma4_tower(emb)
    assert round(sum(map(math.prod, scanned.values())) / 1e9, 2) == params_b
    unscanned = {l.path: l.shape for l in family.plan(cfg, False)}
    assert {k: v for k, v in unscanned.items() if k.startswith("vision_encoder/")} == gemma4_tower(emb)


def _qwen3_vl_text(e: int, layers: int, heads: int, kv: int, mlp: int, experts: int = 0) -> dict:
    """The scanned language model (head_dim 128, vocabulary 151936): dense layers tied; `experts` routed experts of
    width `mlp` under `moe_block` (`[X, layers, ..]`), untied."""
    s = "decoder/layers/"
    out = {"decoder/decoder_norm/scale": (e,), "token_embedder/embedding": (151936, e)}
    out |= {s + f"{k}_self_attention_layer_norm/scale": (e, layers) for k in ("pre", "post")}
    out |= {
        s + f"self_attention/{k}/kernel": (e, layers, n, 128) for k, n in (("query", heads), ("key", kv), ("value", kv))
    }
    out |= {s + f"self_attention/{k}_norm/scale": (128, layers) for k in ("query", "key")}
    out[s + "self_attention/out/kernel"] = (heads, layers, 128, e)
    if not experts:
        return (
            out
            | {s + f"mlp/{k}/kernel": (e, layers, mlp) for k in ("wi_0", "wi_1")}
            | {s + "mlp/wo/kernel": (mlp, layers, e)}
        )
    out |= {s + f"moe_block/{k}": (experts, layers, e, mlp) for k in ("wi_0", "wi_1")}
    out |= {s + "moe_block/wo": (experts, layers, mlp, e), s + "moe_block/gate/kernel": (e, layers, experts)}
    return out | {"decoder/logits_dense/kernel": (e, 151936)}


# Qwen3-VL's language model: all arrays of MaxText 0.2.5's tree with use_multimodal=false (nnx.eval_shape; scanned
# needs deepstack_visual_indexes_for_vit=[], configs/types.py refuses deepstack with scan_layers=true). Unscanned:
# 310 / 398 / 579 arrays. The vision tower's arrays: tests/families/test_qwen3_vl_vision.py.
QWEN3_VL_TEXT = {
    "qwen3-vl-2b": _qwen3_vl_text(2048, 28, 16, 8, 6144),
    "qwen3-vl-4b": _qwen3_vl_text(2560, 36, 32, 8, 9728),
    "qwen3-vl-30b-a3b": _qwen3_vl_text(2048, 48, 32, 4, 768, experts=128),
}
QWEN3_VL_TEXT_UNSCANNED = {"qwen3-vl-2b": 310, "qwen3-vl-4b": 398, "qwen3-vl-30b-a3b": 579}


@pytest.mark.parametrize("name", sorted(QWEN3_VL_TEXT))
def test_qwen3_vl_text_plan_is_maxtexts_whole_text_tree(name, monkeypatch):
    family, cfg = registry.model(name)
    monkeypatch.setattr(family, "vision_tower", False)  # the language model alone (MaxText use_multimodal=false)
    with pytest.warns(UserWarning, match="vision tower"):
        scanned = {l.path: l.shape for l in family.plan(cfg, True)}
        unscanned = {l.path: l.shape for l in family.plan(cfg, False)}
    assert scanned == QWEN3_VL_TEXT[name]
    assert len(unscanned) == QWEN3_VL_TEXT_UNSCANNED[name]
    assert sum(map(math.prod, scanned.values())) == sum(map(math.prod, unscanned.values()))
