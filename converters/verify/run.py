"""`ckptflow verify` / `ckptflow golden`: run both sides on the same token ids and compare.

    verify(maxtext=CKPT, hf=HF_DIR)            # HF model (transformers, CPU) vs the JAX reference
    verify(maxtext=CKPT, golden=FILE)          # saved HF logits vs the JAX reference
    make_golden(hf=HF_DIR, out=FILE)           # write the golden file

The HF model runs first and is released before the MaxText checkpoint is loaded, so peak memory is
one model at a time (plus the logits).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from converters.errors import CkptflowError
from converters.verify import golden as golden_io
from converters.verify.hf_side import HFModel, load_tokenizer, read_config
from converters.verify.metrics import compare_logits, describe_nonfinite, nonfinite_weights, summarize
from converters.verify.prompts import Prompt, build_prompts

log = logging.getLogger("ckptflow.verify")

DEFAULT_MAX_KL = 0.015
DTYPE_CHOICES = ("float32", "bfloat16")
RESULT_VERSION = 1

# Config fields whose disagreement between the HF folder and the checkpoint's sidecar is worth a warning.
_ARCH_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "tie_word_embeddings", "attention_bias",
)


@dataclass
class VerifyResult:
    passed: bool
    data: dict  # everything written to verify.json
    report_files: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return self.data


def _resolve_config(path: str | os.PathLike) -> tuple[dict, Path]:
    p = Path(path)
    if p.is_dir():
        return read_config(p), p
    if p.is_file():
        try:
            return json.loads(p.read_text()), p.parent
        except ValueError as e:
            raise CkptflowError(f"{p}: not valid JSON ({e})") from None
    raise CkptflowError(f"HF config not found: {p}")


def _config_diffs(a: dict, b: dict) -> list[str]:
    return [f for f in _ARCH_FIELDS if (f in a or f in b) and a.get(f) != b.get(f)]


def prompt_vocab_size(config: dict) -> int:
    """Token ids both sides can embed: the reference spec's vocabulary (the HF one, read from a nested
    `text_config` for multimodal configs, and cut to the rows MaxText holds: Gemma3 262144 of 262208)."""
    from converters.verify.jax_ref import get_family
    from converters.verify.jax_ref.common import hf_config_object

    cfg = hf_config_object(config)
    return int(get_family(cfg.model_type).make_spec(cfg).vocab_size)


def _image_prompts(config: dict, seed: int, tokenizer) -> list[Prompt]:
    """Multimodal models (a reference family with `image_prompt`): one prompt holding a generated test image,
    its extra model inputs (pixel values, ...) in `meta["inputs"]`. Empty for text-only models."""
    from converters.verify.jax_ref import get_family

    make = getattr(get_family(config.get("model_type")), "image_prompt", None)
    case = make(config, seed=seed, tokenizer=tokenizer) if make is not None else None
    if case is None:
        return []
    ids, inputs = case
    n = sum(1 for t in inputs.get("token_type_ids", [[]])[0] if t)
    return [Prompt(name="image", token_ids=ids, text=f"[prompt with a generated test image: {n} image tokens]", meta={"inputs": inputs})]


def _check_family(config: dict) -> None:
    from converters.verify.jax_ref import get_family

    get_family(config.get("model_type"))


class MaxTextSide:
    """The checkpoint, its sidecar, and the JAX reference built from it."""

    def __init__(self, path: str | os.PathLike):
        from converters import orbax_io

        self.items = orbax_io.find_items_dir(path)
        self.sidecar_dir = orbax_io.find_sidecar_dir(path)
        self.sidecar_config = orbax_io.find_sidecar_hf_config(path)

    def build(self, config: dict, dtype: str):
        from converters import orbax_io
        from converters.verify.jax_ref import ReferenceModel

        t = time.perf_counter()
        params = orbax_io.read_params(self.items)
        self.nonfinite = nonfinite_weights(params.items())
        log.info("read %d arrays from %s in %.1fs", len(params), self.items, time.perf_counter() - t)
        return ReferenceModel(params, config, dtype=dtype)


def _decoder(tokenizer):
    if tokenizer is None:
        return None

    def decode(i: int) -> str:
        try:
            return tokenizer.decode([i])
        except Exception:  # ids the tokenizer does not know (padded vocab)
            return ""

    return decode


def _prompt_entry(p: Prompt) -> dict:
    return {"name": p.name, "label": p.label(), "text": p.text, "token_ids": p.token_ids}


def verify(
    *,
    maxtext: str | os.PathLike,
    hf: str | os.PathLike | None = None,
    golden: str | os.PathLike | None = None,
    hf_config: str | os.PathLike | None = None,
    max_kl: float = DEFAULT_MAX_KL,
    prompts_file: str | os.PathLike | None = None,
    dtype: str = "float32",
    report_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> VerifyResult:
    """Compare a MaxText checkpoint with its HF source (or a golden file). Raises CkptflowError on bad input."""
    if (hf is None) == (golden is None):
        raise CkptflowError("give exactly one reference: an HF model folder or a golden file")
    if dtype not in DTYPE_CHOICES:
        raise CkptflowError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPE_CHOICES)})")
    if not (max_kl > 0):
        raise CkptflowError(f"--max-kl must be positive, got {max_kl}")
    if golden is not None and prompts_file is not None:
        raise CkptflowError("--prompts cannot be combined with --golden (the golden file fixes the prompts)")

    mt = MaxTextSide(maxtext)
    warnings: list[str] = []
    nonfinite: dict[str, dict] = {}  # side -> {tensor name: {"nan": n, "inf": m}}
    timing: dict = {}

    # ---- configuration, tokenizer, prompts ------------------------------------------------------
    if hf is not None:
        config = read_config(hf)
        _check_family(config)
        if mt.sidecar_config is not None:
            diffs = _config_diffs(config, mt.sidecar_config)
            if diffs:
                warnings.append(
                    f"the checkpoint was converted from a config that differs from {hf} in: {', '.join(diffs)}"
                )
        tokenizer = load_tokenizer(hf, mt.sidecar_dir)
    else:
        if hf_config is not None:
            config, cfg_dir = _resolve_config(hf_config)
        elif mt.sidecar_config is not None:
            config, cfg_dir = mt.sidecar_config, mt.sidecar_dir
        else:
            raise CkptflowError(
                f"{mt.items}: no ckptflow/hf/config.json beside the checkpoint; pass --hf-config with the model's config.json"
            )
        _check_family(config)
        tokenizer = load_tokenizer(mt.sidecar_dir, cfg_dir)

    if golden is not None:
        records = golden_io.read_golden(golden)
        prompts = [r.prompt for r in records]
        ref_logits = [r.logits for r in records]
        golden_dtype = records[0].meta.get("dtype")
        if golden_dtype and golden_dtype != dtype:
            log.info("golden logits were computed in %s; the MaxText side runs in %s", golden_dtype, dtype)
        reference = {"kind": "golden", "path": str(golden), "dtype": golden_dtype, "model_type": records[0].meta.get("model_type")}
    else:
        vocab = prompt_vocab_size(config)
        prompts = build_prompts(tokenizer=tokenizer, vocab_size=vocab, prompts_file=prompts_file, seed=seed)
        prompts += _image_prompts(config, seed, tokenizer)
        log.info("prompts: %s", ", ".join(f"{p.name} ({p.length} tokens)" for p in prompts))
        log.info("HF side: loading %s (%s)", hf, dtype)
        t0 = time.perf_counter()
        model = HFModel(hf, dtype=dtype)
        nonfinite["hf"] = model.nonfinite_weights()
        ref_logits = []
        for p in prompts:
            ref_logits.append(model.logits(p.token_ids, **p.meta.get("inputs", {})))
        timing["reference_seconds"] = round(time.perf_counter() - t0, 3)
        log.info("HF side: %d prompts in %.1fs", len(prompts), timing["reference_seconds"])
        del model
        gc.collect()
        reference = {"kind": "hf", "path": str(hf), "dtype": dtype, "model_type": config.get("model_type")}

    # ---- MaxText side ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    ref_model = mt.build(config, dtype)
    nonfinite["maxtext"] = mt.nonfinite
    warnings += ref_model.warnings
    for side, found in nonfinite.items():
        if found:
            where = "the HF model" if side == "hf" else "the MaxText checkpoint"
            warnings.append(f"non-finite weights in {where}: {describe_nonfinite(found)}")
    layout = "scanned" if ref_model.scanned else "unscanned"
    log.info("MaxText side: %s checkpoint, %s reference forward in %s", layout, ref_model.spec.model_type, dtype)
    mt_logits, per_prompt_seconds = [], []
    for p in prompts:
        t1 = time.perf_counter()
        if "inputs" in p.meta:  # a prompt holding an image (its image-token ids are outside the text vocabulary)
            mt_logits.append(ref_model.family.image_logits(ref_model, p.token_ids, p.meta["inputs"]))
            per_prompt_seconds.append(round(time.perf_counter() - t1, 3))
            log.info("MaxText side: %s (%d tokens) in %.1fs", p.name, p.length, per_prompt_seconds[-1])
            continue
        bad = [t for t in p.token_ids if not 0 <= t < ref_model.spec.vocab_size]
        if bad:
            raise CkptflowError(f"prompt {p.name!r} has token id {bad[0]} outside the model's vocabulary")
        mt_logits.append(ref_model.logits(p.token_ids))
        per_prompt_seconds.append(round(time.perf_counter() - t1, 3))
        log.info("MaxText side: %s (%d tokens) in %.1fs", p.name, p.length, per_prompt_seconds[-1])
    timing["maxtext_seconds"] = round(time.perf_counter() - t0, 3)
    timing["maxtext_per_prompt_seconds"] = per_prompt_seconds

    # ---- compare ---------------------------------------------------------------------------------
    decode = _decoder(tokenizer)
    per_prompt = []
    for p, ref, test in zip(prompts, ref_logits, mt_logits):
        if ref.shape[0] != p.length:
            raise CkptflowError(f"reference logits for {p.name!r} cover {ref.shape[0]} positions, not {p.length}")
        m = compare_logits(p.name, ref, test, max_kl=max_kl, decode=decode)
        per_prompt.append(m)
        log.info(
            "%-8s %4d tok  KL mean %.3e max %.3e  max|dlogit| %.3e  top10 %d/10  %s",
            p.name, p.length, m.kl_mean, m.kl_max, m.max_abs_logit_diff, m.top10_overlap, "ok" if m.passed else "FAIL",
        )
    summary = summarize(per_prompt, max_kl)
    if any(nonfinite.values()):  # a checkpoint holding NaN/Inf is never a pass, whatever the logits show
        summary["passed"] = False
    summary["nonfinite_weights"] = {side: found for side, found in nonfinite.items() if found}
    for w in warnings:
        log.warning("%s", w)

    data = {
        "version": RESULT_VERSION,
        "passed": summary["passed"],
        "dtype": dtype,
        "max_kl": max_kl,
        "reference": reference,
        "maxtext": {
            "path": str(mt.items),
            "layout": layout,
            "model_type": ref_model.spec.model_type,
            "num_layers": ref_model.spec.num_layers,
            "vocab_size": ref_model.vocab_size,
        },
        "tokenizer": bool(tokenizer is not None),
        "summary": summary,
        "prompts": [{**_prompt_entry(p), **m.to_dict()} for p, m in zip(prompts, per_prompt)],
        "timing": timing,
        "warnings": warnings,
    }
    result = VerifyResult(passed=summary["passed"], data=data)
    if report_dir is not None:
        from converters.verify.report import write_report

        result.report_files = {k: str(v) for k, v in write_report(data, report_dir).items()}
        log.info("report written to %s", report_dir)
    return result


def make_golden(
    *,
    hf: str | os.PathLike,
    out: str | os.PathLike,
    prompts_file: str | os.PathLike | None = None,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Run the HF model on the prompts and save its logits as a golden JSON-lines file."""
    if dtype not in DTYPE_CHOICES:
        raise CkptflowError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPE_CHOICES)})")
    config = read_config(hf)
    tokenizer = load_tokenizer(hf)
    prompts = build_prompts(tokenizer=tokenizer, vocab_size=prompt_vocab_size(config), prompts_file=prompts_file, seed=seed)
    model = HFModel(hf, dtype=dtype)
    size = golden_io.estimated_size_bytes(prompts, model.vocab_size)
    log.info("golden: %d prompts, ~%s of JSON", len(prompts), golden_io.human_bytes(size))
    records = [(p, model.logits(p.token_ids)) for p in prompts]
    meta = {"dtype": dtype, "model_type": config.get("model_type"), "vocab_size": model.vocab_size, "source": str(hf)}
    path = golden_io.write_golden(out, records, meta)
    log.info("golden logits written to %s", path)
    return path
