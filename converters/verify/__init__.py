"""Verification: prove a MaxText checkpoint computes what its Hugging Face source computes.

Public API:
    verify(maxtext=..., hf=... | golden=..., max_kl=0.015, dtype="float32", ...) -> VerifyResult
    make_golden(hf=..., out=...) -> Path
    ReferenceModel(params, hf_config_dict, dtype=...).logits(token_ids)   (converters.verify.reference)

Heavy libraries (torch, jax, transformers) are imported only when used.
"""

from converters.verify.run import DEFAULT_MAX_KL, VerifyResult, make_golden, verify

__all__ = ["DEFAULT_MAX_KL", "VerifyResult", "make_golden", "verify"]
