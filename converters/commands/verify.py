"""`ckptflow verify --hf HF_DIR --maxtext CKPT` (or `--golden FILE`): prove a conversion with logits."""

import argparse
import json
import logging
import sys

DESCRIPTION = """\
Run the same token ids through the Hugging Face model (transformers, PyTorch, CPU) and through a JAX
reference of what MaxText computes for the checkpoint (read as MaxText lays it out, scanned or
unscanned), then compare the logits at every position:

  KL(P_hf || Q_maxtext) per token (vocab cut to the smaller side), its mean and max, the max absolute
  logit difference, and top-10 overlap / Jaccard / rank agreement at the last position.

The command fails (exit 1) when the max per-token KL exceeds --max-kl. Default prompts: three short
ones and a ~500-token one (short prompts cannot catch RoPE errors: rotation at position 0 is the
identity). Without a tokenizer, fixed seeded token ids of the same lengths are used.

--dtype float32 (default) checks the conversion itself: expect max KL around 1e-6 or below (only
accumulation-order differences). --dtype bfloat16 runs both sides in bf16 as MaxText would; the
default --max-kl 0.015 is the threshold MaxText's own checker uses for bf16.

exit status: 0 passed, 1 KL above threshold, 2 bad input.

examples:
  ckptflow verify --hf ./Qwen3-0.6B --maxtext ./qwen3-mt
  ckptflow verify --hf ./Llama-3.1-8B --maxtext ./llama-mt/0/items --dtype bfloat16 --report ./verify-out
  ckptflow golden --hf ./Qwen3-0.6B --out qwen3.golden.jsonl      # where HF can run
  ckptflow verify --golden qwen3.golden.jsonl --maxtext ./qwen3-mt  # where MaxText runs
"""


def add_parser(sub):
    from converters.verify.run import DEFAULT_MAX_KL, DTYPE_CHOICES

    p = sub.add_parser("verify", help="compare HF and MaxText logits", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--hf", metavar="HF_DIR", help="the Hugging Face model folder the checkpoint was converted from")
    ref.add_argument("--golden", metavar="FILE", help="golden logits written earlier by `ckptflow golden` (JSON lines)")
    p.add_argument("--maxtext", required=True, metavar="CKPT_DIR",
                   help="MaxText checkpoint: our output folder, its 0/items, or a training run directory")
    p.add_argument("--max-kl", type=float, default=DEFAULT_MAX_KL, metavar="X",
                   help=f"fail when any token's KL exceeds X (default {DEFAULT_MAX_KL})")
    p.add_argument("--prompts", metavar="FILE",
                   help="prompts to use instead of the defaults: text (one per line) or .jsonl with 'prompt' and/or 'tokens'")
    p.add_argument("--report", metavar="DIR", help="write verify.json, verify.md and kl_per_token.png to DIR")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="compute dtype of both sides (default float32)")
    p.add_argument("--hf-config", metavar="PATH",
                   help="--golden only: the model's config.json (or its folder) when the checkpoint has no ckptflow/hf sidecar")
    p.add_argument("--seed", type=int, default=0, help="seed of the token ids used when there is no tokenizer (default 0)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    return p


def setup_logging(quiet: bool) -> None:
    log = logging.getLogger("ckptflow.verify")
    if not any(getattr(h, "_ckptflow", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        h._ckptflow = True
        log.addHandler(h)
        log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def run(args) -> int:
    from converters.errors import CkptflowError
    from converters.verify.run import verify

    if args.hf_config and not args.golden:
        raise CkptflowError("--hf-config is only used with --golden (with --hf the HF folder's config is used)")
    setup_logging(args.quiet)
    result = verify(
        maxtext=args.maxtext, hf=args.hf, golden=args.golden, hf_config=args.hf_config, max_kl=args.max_kl,
        prompts_file=args.prompts, dtype=args.dtype, report_dir=args.report, seed=args.seed,
    )
    s = result.data["summary"]
    verdict = "PASSED" if result.passed else "FAILED"
    print(f"verify {verdict}: max per-token KL {s['kl_max']:.3e} (threshold {s['max_kl_threshold']:g}, "
          f"prompt {s['kl_max_prompt']}), mean KL {s['kl_mean']:.3e}, max |dlogit| {s['max_abs_logit_diff']:.3e}, "
          f"{result.data['maxtext']['layout']} {result.data['maxtext']['model_type']}, {result.data['dtype']}", file=sys.stderr)
    if args.json:
        json.dump(result.data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0 if result.passed else 1
