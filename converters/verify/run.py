"""`ckptflow verify` / `ckptflow golden`: the prompts, the run, and a verdict in three parts.

    verify(maxtext=CKPT, hf=HF_DIR)            # the source folder against the checkpoint
    verify(maxtext=CKPT, golden=FILE)          # saved HF logits against the checkpoint
    make_golden(hf=HF_DIR, out=FILE)           # write the golden file

The verdict (each part in the report and in verify.json):
  * content: does the checkpoint hold this source's weights? Every tensor mapped back as `convert --to hf`
    computes it and compared with the source's: bit-exact, or within the bound the format implies
    (`converters.verify.content`). Fails by tensor name.
  * layout: does MaxText compute the source model from this checkpoint? The JAX reference of MaxText on the
    checkpoint against transformers on the checkpoint's values mapped back, both float32: the same weights, so a
    correct conversion differs by accumulation order only; a mapping error that the inverse would hide (a RoPE
    layout, a transposition, a scale wrong the same way in both directions) does not. Threshold: the family's
    `layout_max_kl` (1e-5).
  * precision: what do the dtype and MaxText's format cost? transformers on the source against MaxText on the
    checkpoint in the run's dtype, judged against `max_kl` (0.015, MaxText's own checker's threshold), and taken
    apart: the format (transformers on the source vs on the checkpoint's values), bfloat16 computation (MaxText
    bf16 vs float32) set against transformers' own bf16-vs-float32 difference on the same prompts.
Everything streams one layer at a time (`converters.verify.engine`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from converters.errors import CkptflowError
from converters.verify.hf_side import load_tokenizer, read_config
from converters.verify.metrics import describe_nonfinite, summarize
from converters.verify.prompts import Prompt, build_prompts

log = logging.getLogger("ckptflow.verify")

DEFAULT_MAX_KL = 0.015
DTYPE_CHOICES = ("float32", "bfloat16")
RESULT_VERSION = 2

# Config fields whose disagreement between the HF folder and the checkpoint's sidecar is worth a warning.
_ARCH_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "tie_word_embeddings",
    "attention_bias",
)
STREAM_NAMES = {
    "hf": "transformers on the source weights",
    "hf_ckpt": "transformers on the checkpoint's values (mapped back, float32)",
    "hf_bf16": "transformers on the source weights, bfloat16",
    "maxtext": "MaxText reference on the checkpoint, float32",
    "maxtext_bf16": "MaxText reference on the checkpoint, bfloat16",
    "golden": "golden logits",
}


@dataclass
class VerifyResult:
    passed: bool
    data: dict  # everything written to verify.json
    report_files: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return self.data


def _config_diffs(a: dict, b: dict) -> list[str]:
    return [f for f in _ARCH_FIELDS if (f in a or f in b) and a.get(f) != b.get(f)]


def prompt_vocab_size(config: dict) -> int:
    """Token ids both sides can embed: the reference spec's vocabulary (the HF one, read from a nested
    `text_config` for multimodal configs, and cut to the rows MaxText holds: Gemma3 262144 of 262208)."""
    from converters.verify.reference import forward_for
    from converters.verify.reference.common import hf_config_object

    cfg = hf_config_object(config)
    return int(forward_for(cfg.model_type, config).make_spec(cfg).vocab_size)


def _without_placeholders(config: dict, prompts: list[Prompt]) -> list[Prompt]:
    """Seeded prompts without the image / video / audio placeholder ids of a multimodal model (a reference family with
    `placeholder_ids`, Gemma 4): in a text prompt transformers embeds those as padding and MaxText as the token, so
    no conversion could make the two agree there. Prompts from a tokenizer or a file are left as given."""
    from converters.verify.reference import forward_for

    ids_of = getattr(forward_for(config.get("model_type")), "placeholder_ids", None)
    bad = set(ids_of(config)) if ids_of is not None else set()
    if not bad:
        return prompts
    return [replace(p, token_ids=[t for t in p.token_ids if t not in bad]) if "seed" in p.meta else p for p in prompts]


def _image_prompts(config: dict, seed: int, tokenizer) -> list[Prompt]:
    """Multimodal models (a reference family with `image_prompt`): one prompt holding a generated test image,
    its extra model inputs (pixel values, ...) in `meta["inputs"]`. Empty for text-only models."""
    from converters.verify.reference import forward_for

    make = getattr(forward_for(config.get("model_type"), config), "image_prompt", None)
    case = make(config, seed=seed, tokenizer=tokenizer) if make is not None else None
    if case is None:
        return []
    ids, inputs = case
    types = inputs.get("token_type_ids", inputs.get("mm_token_type_ids", [[]]))  # Gemma3 / Qwen3-VL: 1 = image token
    n = sum(1 for t in types[0] if t)
    return [
        Prompt(
            name="image",
            token_ids=ids,
            text=f"[prompt with a generated test image: {n} image tokens]" if n else "[prompt with a test image]",
            meta={"inputs": inputs},
        )
    ]


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


def _check_source(source, ckpt) -> None:
    """The source folder has every tensor the checkpoint maps back to, with its shape (else nothing compares)."""
    from converters.convert.common import listing

    missing = [n for n in ckpt.index.tensors if n not in source]
    if missing:
        raise CkptflowError(
            f"the HF folder lacks tensors the checkpoint holds: {listing(missing)} (wrong --hf folder?)"
        )
    bad = [
        f"{n} (source {list(source.folder.info(n).shape)}, checkpoint {list(t.leaf.hf_shape)})"
        for n, t in ckpt.index.tensors.items()
        if tuple(source.folder.info(n).shape) != tuple(t.leaf.hf_shape)
    ]
    if bad:
        raise CkptflowError(
            f"the HF folder does not match the checkpoint's shapes: {listing(bad, 3)} (wrong --hf folder?)"
        )


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
    """Verify a MaxText checkpoint against its HF source (or a golden file). Raises CkptflowError on bad input."""
    from converters.core import registry
    from converters.families.deepseek import as_transformers_builds_it
    from converters.io.orbax import find_items_dir, find_sidecar_dir
    from converters.verify.engine import Engine
    from converters.verify.golden import GoldenFile
    from converters.verify.weights import CheckpointWeights, SourceWeights, config_of_checkpoint

    if (hf is None) == (golden is None):
        raise CkptflowError("give exactly one reference: an HF model folder or a golden file")
    if dtype not in DTYPE_CHOICES:
        raise CkptflowError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPE_CHOICES)})")
    if not (max_kl > 0):
        raise CkptflowError(f"--max-kl must be positive, got {max_kl}")
    if golden is not None and prompts_file is not None:
        raise CkptflowError("--prompts cannot be combined with --golden (the golden file fixes the prompts)")

    items = find_items_dir(maxtext)
    sidecar = find_sidecar_dir(maxtext)
    warnings: list[str] = []
    golden_file = None
    if hf is not None:
        config = read_config(hf)
        registry.family_for_config(config)  # unsupported model type or class: fail before reading anything
        sidecar_config = read_config(sidecar) if sidecar is not None else None
        if sidecar_config is not None and _config_diffs(config, sidecar_config):
            warnings.append(
                f"the checkpoint was converted from a config that differs from {hf} in: "
                f"{', '.join(_config_diffs(config, sidecar_config))}"
            )
        tokenizer = load_tokenizer(hf, sidecar)
    else:
        config, cfg_dir = config_of_checkpoint(maxtext, hf_config)
        registry.family_for_config(config)  # unsupported model type or class: fail before reading anything
        tokenizer = load_tokenizer(sidecar, cfg_dir)

    # Kimi-K2's kimi_k2 as the deepseek_v3 it is (its repos load it through remote code, never run here): both
    # sides of verify then build the same model
    config = as_transformers_builds_it(config)
    ckpt = CheckpointWeights(items, config)
    family = registry.family_for_config(config)
    source = None
    if hf is not None:
        source = SourceWeights(hf, family, config)
        _check_source(source, ckpt)
        prompts = build_prompts(
            tokenizer=tokenizer, vocab_size=prompt_vocab_size(ckpt.cfg), prompts_file=prompts_file, seed=seed
        )
        prompts = _without_placeholders(ckpt.cfg, prompts)
        prompts += _image_prompts(ckpt.cfg, seed, tokenizer)
        reference = {"kind": "hf", "path": str(hf), "dtype": dtype, "model_type": config.get("model_type")}
    else:
        golden_file = GoldenFile(golden)
        prompts = [r.prompt for r in golden_file.records]
        meta = golden_file.records[0].meta
        reference = {
            "kind": "golden",
            "path": str(golden),
            "dtype": meta.get("dtype"),
            "model_type": meta.get("model_type"),
        }
        if meta.get("dtype") and meta.get("dtype") != dtype:
            log.info("golden logits were computed in %s; the MaxText side runs in %s", meta.get("dtype"), dtype)
    log.info("prompts: %s", ", ".join(f"{p.name} ({p.length} tokens)" for p in prompts))
    try:
        engine = Engine(config=config, prompts=prompts, dtype=dtype, source=source, ckpt=ckpt, golden=golden_file)
        ref = engine.reference
        bad = [
            (p.name, t) for p in prompts if "inputs" not in p.meta for t in p.token_ids if not 0 <= t < ref.vocab_size
        ]
        if bad:
            raise CkptflowError(f"prompt {bad[0][0]!r} has token id {bad[0][1]} outside the model's vocabulary")
        warnings += ref.warnings
        layout_name = "scanned" if ref.scanned else "unscanned"
        log.info("%s %s checkpoint; streams: %s", layout_name, ref.spec.model_type, ", ".join([*engine.hf, *engine.mt]))
        engine.run()
    finally:
        if golden_file is not None:
            golden_file.close()

    nonfinite = {
        side: found for side, found in (("hf", engine.nonfinite.found), ("maxtext", ckpt.nonfinite.found)) if found
    }
    for side, found in nonfinite.items():
        warnings.append(
            f"non-finite weights in {'the HF model' if side == 'hf' else 'the MaxText checkpoint'}: "
            f"{describe_nonfinite(found)}"
        )
    data = _result(
        engine,
        prompts,
        tokenizer,
        dtype=dtype,
        max_kl=max_kl,
        reference=reference,
        warnings=warnings,
        items=items,
        nonfinite=nonfinite,
    )
    result = VerifyResult(passed=data["passed"], data=data)
    for w in warnings:
        log.warning("%s", w)
    if report_dir is not None:
        from converters.verify.report import write_report

        result.report_files = {k: str(v) for k, v in write_report(data, report_dir).items()}
        log.info("report written to %s", report_dir)
    return result


def _result(
    engine,
    prompts: list[Prompt],
    tokenizer,
    *,
    dtype: str,
    max_kl: float,
    reference: dict,
    warnings: list[str],
    items,
    nonfinite: dict,
) -> dict:
    """verify.json: the verdict, every comparison per prompt, timing."""
    ref = engine.reference
    decode = _decoder(tokenizer)
    layout_max_kl = ref.forward.layout_max_kl
    comparisons = {}
    for name, c in engine.comparisons.items():
        threshold = layout_max_kl if name == "layout" else max_kl
        per_prompt = [s.result(p.name, max_kl=threshold, decode=decode) for s, p in zip(c.stats, prompts)]
        comparisons[name] = {
            "reference": c.ref,
            "test": c.test,
            "description": f"{STREAM_NAMES[c.ref]} vs {STREAM_NAMES[c.test]}",
            "summary": summarize(per_prompt, threshold),
            "prompts": per_prompt,
        }
        s = comparisons[name]["summary"]
        log.info(
            "%-12s max KL %.3e (prompt %s), mean %.3e, max|dlogit| %.3e, top-1 agreement %.1f%%",
            name,
            s["kl_max"],
            s["kl_max_prompt"],
            s["kl_mean"],
            s["max_abs_logit_diff"],
            100 * s["top1_agreement"],
        )
    content = engine.content.to_dict() if engine.content is not None else None
    if content is not None:
        for f in content["failures"]:
            log.warning(
                "content: %s differs from the source (%d elements outside the bound, max |error| %.3g)",
                f["tensor"],
                f["elements_outside_bound"],
                f["max_abs_error"],
            )
    layout = comparisons.get("layout", {}).get("summary")
    precision = comparisons["precision"]["summary"]
    verdict = {
        "content": {
            "ran": content is not None,
            "passed": None if content is None else content["passed"],
            **(content or {"why": "no source weights (golden file)"}),
        },
        "layout": {
            "ran": layout is not None,
            "passed": None if layout is None else layout["passed"],
            "max_kl": layout_max_kl,
            **(
                {"kl_max": layout["kl_max"], "kl_mean": layout["kl_mean"], "kl_max_prompt": layout["kl_max_prompt"]}
                if layout
                else {"why": "no source weights (golden file): layout and precision cannot be told apart"}
            ),
        },
        "precision": {
            "ran": True,
            "passed": precision["passed"],
            "max_kl": max_kl,
            "kl_max": precision["kl_max"],
            "kl_mean": precision["kl_mean"],
            "kl_max_prompt": precision["kl_max_prompt"],
            "explanation": _explain(engine, comparisons, content, dtype=dtype, max_kl=max_kl),
        },
    }
    passed = all(v["passed"] for v in verdict.values() if v["ran"]) and not nonfinite  # NaN / Inf: never a pass
    brief = {name: {p.name: m.brief() for p, m in zip(prompts, c["prompts"])} for name, c in comparisons.items()}
    return {
        "version": RESULT_VERSION,
        "passed": passed,
        "dtype": dtype,
        "max_kl": max_kl,
        "reference": reference,
        "maxtext": {
            "path": str(items),
            "layout": "scanned" if ref.scanned else "unscanned",
            "model_type": ref.spec.model_type,
            "num_layers": ref.spec.num_layers,
            "vocab_size": ref.vocab_size,
            "dtype": engine.ckpt.dtype.name,
        },
        "tokenizer": tokenizer is not None,
        "verdict": verdict,
        # the end-to-end comparison (the number MaxText's own checker reports), with the overall verdict
        "summary": {
            **precision,
            "passed": passed,
            **{f"{k}_passed": v["passed"] for k, v in verdict.items()},
            **({"layout_kl_max": layout["kl_max"]} if layout else {}),
            "nonfinite_weights": nonfinite,
        },
        "comparisons": {name: {k: v for k, v in c.items() if k != "prompts"} for name, c in comparisons.items()},
        "prompts": [
            {**_prompt_entry(p), **m.to_dict(), "comparisons": {n: brief[n][p.name] for n in brief}}
            for p, m in zip(prompts, comparisons["precision"]["prompts"])
        ],
        "timing": {**engine.timer.to_dict(), "expert_reads": engine.expert_reads},
        "warnings": warnings,
    }


def _explain(engine, comparisons: dict, content: dict | None, *, dtype: str, max_kl: float) -> list[str]:
    """The precision number taken apart, in words; advice when it fails."""
    kl = {name: c["summary"]["kl_max"] for name, c in comparisons.items()}
    out = list(content["effects"]) if content else []
    for t in engine.index.tensors.values():
        r = t.leaf.rule
        if r.runtime_chain is not None:
            from converters.verify.content import describe_chain

            out.append(
                f"{t.kind}: MaxText computes with the stored {describe_chain(r.chain)}, transformers in float32 with "
                f"{describe_chain(r.runtime_chain)}; part of the format cost"
            )
    if "format" in kl:
        out.append(f"format: transformers on the checkpoint's values vs on the source: max KL {kl['format']:.3g}")
        top1 = comparisons["format"]["summary"]["top1_agreement"]
        if top1 < 1.0 and engine.ckpt.dtype.name != "float32":
            out.append(
                f"the checkpoint's {engine.ckpt.dtype.name} values change the most likely next token at "
                f"{1 - top1:.1%} of "
                "the positions: greedy output may change; --dtype float32 keeps the source's values exactly"
            )
    if "layout" in kl:
        out.append(f"layout: MaxText vs transformers on the same values (float32): max KL {kl['layout']:.3g}")
    if "bf16_compute" in kl:
        out.append(
            f"bfloat16 computation: MaxText bfloat16 vs float32: max KL {kl['bf16_compute']:.3g}; transformers' own "
            f"bfloat16 vs float32 on the same prompts: {kl['hf_bf16']:.3g}"
        )
    if kl["precision"] > max_kl:
        if kl.get("format", 0) > max_kl / 2 and engine.ckpt.dtype.name == "bfloat16":
            out.append(
                f"the checkpoint's bfloat16 values alone cost KL {kl['format']:.3g}: greedy output may change; "
                "convert with --dtype float32 to keep them exact"
            )
        if kl.get("bf16_compute", 0) > max_kl / 2:
            out.append(
                f"computing in bfloat16 costs KL {kl['bf16_compute']:.3g} here (transformers' own bfloat16: "
                f"{kl['hf_bf16']:.3g}); --dtype float32 measures the conversion without it"
            )
    return out


def make_golden(
    *,
    hf: str | os.PathLike,
    out: str | os.PathLike,
    prompts_file: str | os.PathLike | None = None,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Run the HF model on the prompts, one layer at a time, and save its logits as a golden JSON-lines file."""
    from converters.core import registry
    from converters.families.deepseek import as_transformers_builds_it
    from converters.verify.engine import Engine
    from converters.verify.golden import GoldenWriter, estimated_size_bytes, human_bytes
    from converters.verify.weights import SourceWeights

    if dtype not in DTYPE_CHOICES:
        raise CkptflowError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPE_CHOICES)})")
    config = as_transformers_builds_it(read_config(hf))
    family = registry.family_for_config(config)
    tokenizer = load_tokenizer(hf)
    prompts = build_prompts(
        tokenizer=tokenizer, vocab_size=prompt_vocab_size(config), prompts_file=prompts_file, seed=seed
    )
    engine = Engine(config=config, prompts=prompts, dtype=dtype, source=SourceWeights(hf, family, config))
    log.info(
        "golden: %d prompts, ~%s of JSON", len(prompts), human_bytes(estimated_size_bytes(prompts, engine.head_rows))
    )
    meta = {"dtype": dtype, "model_type": config.get("model_type"), "vocab_size": engine.head_rows, "source": str(hf)}
    with GoldenWriter(out, prompts, engine.head_rows, meta) as writer:
        engine.golden_writer = writer
        engine.run()
    log.info("golden logits written to %s", out)
    return Path(out)
