"""`ckptflow verify --hf HF_DIR --maxtext CKPT` (or `--golden FILE`): prove a conversion with logits."""

import argparse
import json
import logging
import sys

DESCRIPTION = """\
Prove a conversion: run the same prompts through transformers (the model the checkpoint came from) and through
a JAX reference of what MaxText's layers compute on the checkpoint (read as MaxText lays it out, scanned or
unscanned), one layer at a time on both sides, and answer three questions:

  content    does the checkpoint hold this source's weights? Every tensor is mapped back exactly as
             `convert --to hf` would and compared with the source: bit-exact, or within the rounding MaxText's
             format implies (Llama's query x 1/sqrt(head_dim) and Gemma's norms as 1 + w in bfloat16). A wrong
             folder, an edited tensor, a swapped layer or expert fails here, by name.
  layout     does MaxText compute the source model from it? The reference on the checkpoint against
             transformers on the same values, both float32: a correct conversion is at accumulation-order noise
             (max KL around 1e-12 to 1e-9; fails above 1e-5). RoPE layouts, transpositions and scales wrong the
             same way in both directions fail here, even on short prompts.
  precision  what do the dtype and the format cost? transformers on the source against MaxText in --dtype,
             judged against --max-kl (0.015, MaxText's own checker's threshold), and taken apart in the report:
             the format's rounding alone, and with --dtype bfloat16 the cost of computing in bf16 next to
             transformers' own bf16-vs-float32 difference on the same prompts.

Exit status: 0 all three pass, 1 content or layout failed or precision above --max-kl, 2 bad input.

Prompts: three short ones and one of ~500 tokens of varied text (several genres and languages, code, a
question): rotation at position 0 is the identity, so only long prompts show position-dependent mistakes in
the precision numbers. Without a tokenizer, seeded token ids of the same lengths. Gemma3 multimodal
checkpoints get a prompt holding a generated image too.

Memory: nothing is loaded whole. Each side reads one layer's weights, runs every prompt through it and lets it
go before the next is read; a mixture-of-experts layer reads one expert at a time (each once for every side);
the output projection goes in vocabulary blocks. Peak: about two copies of the largest layer (or expert) in
float32, plus the prompts' activations and one vocabulary block, whatever the depth or number of experts
(an 8B model verifies in ~4 GB). Time: about three forward passes (transformers twice, the reference once);
bfloat16 adds two more.

examples:
  ckptflow verify --hf ./Qwen3-0.6B --maxtext ./qwen3-mt
  ckptflow verify --hf ./Llama-3.1-8B --maxtext ./llama-mt/0/items --dtype bfloat16 --report ./verify-out
  ckptflow golden --hf ./Qwen3-0.6B --out qwen3.golden.jsonl      # where the HF folder is
  ckptflow verify --golden qwen3.golden.jsonl --maxtext ./qwen3-mt  # where the checkpoint is (precision only)
"""


def add_parser(sub):
    from converters.verify.run import DEFAULT_MAX_KL, DTYPE_CHOICES

    p = sub.add_parser(
        "verify",
        help="compare HF and MaxText logits",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--hf", metavar="HF_DIR", help="the Hugging Face model folder the checkpoint was converted from")
    ref.add_argument("--golden", metavar="FILE", help="golden logits written earlier by `ckptflow golden` (JSON lines)")
    p.add_argument(
        "--maxtext",
        required=True,
        metavar="CKPT_DIR",
        help="MaxText checkpoint: our output folder, its 0/items, or a training run directory",
    )
    p.add_argument(
        "--max-kl",
        type=float,
        default=DEFAULT_MAX_KL,
        metavar="X",
        help=f"precision: fail when any token's KL (source model vs MaxText in --dtype) exceeds X (default "
        f"{DEFAULT_MAX_KL})",
    )
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts to use instead of the defaults: text (one per line) or .jsonl with 'prompt' and/or 'tokens'",
    )
    p.add_argument("--report", metavar="DIR", help="write verify.json, verify.md and kl_per_token.png to DIR")
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="float32",
        help="compute dtype the precision is judged in (default float32); content and layout are always exact/float32",
    )
    p.add_argument(
        "--hf-config",
        metavar="PATH",
        help="--golden only: the model's config.json (or its folder) when the checkpoint has no ckptflow/hf sidecar",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the token ids used when there is no tokenizer (default 0)"
    )
    p.add_argument("--json", action="store_true", help="print the full result as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    return p


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted (a captured or replaced stream stays usable)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(quiet: bool) -> None:
    log = logging.getLogger("ckptflow.verify")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        h = _Stderr()
        h.setFormatter(logging.Formatter("%(message)s"))
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
        maxtext=args.maxtext,
        hf=args.hf,
        golden=args.golden,
        hf_config=args.hf_config,
        max_kl=args.max_kl,
        prompts_file=args.prompts,
        dtype=args.dtype,
        report_dir=args.report,
        seed=args.seed,
    )
    d = result.data
    v = d["verdict"]

    def part(name: str) -> str:
        p = v[name]
        return f"{name} {'-' if not p['ran'] else ('ok' if p['passed'] else 'FAILED')}"

    c, lay, pre = v["content"], v["layout"], v["precision"]
    details = []
    if c["ran"]:
        details.append(
            f"content: {c['bit_exact']}/{c['tensors']} tensors bit-exact, {c['within_bound']} within the format's "
            f"bound, "
            f"{c['failed']} differ" + (f" (first: {c['failures'][0]['tensor']})" if c["failures"] else "")
        )
    if lay["ran"]:
        details.append(f"layout: max KL {lay['kl_max']:.3e} (threshold {lay['max_kl']:g})")
    details.append(
        f"precision: max KL {pre['kl_max']:.3e} (threshold {pre['max_kl']:g}, prompt {pre['kl_max_prompt']}, "
        f"{d['dtype']})"
    )
    print(
        f"verify {'PASSED' if result.passed else 'FAILED'} [{', '.join(part(n) for n in v)}] "
        f"{d['maxtext']['layout']} {d['maxtext']['model_type']}: " + "; ".join(details),
        file=sys.stderr,
    )
    if args.json:
        json.dump(result.data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0 if result.passed else 1
