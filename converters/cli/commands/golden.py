"""`ckptflow golden --hf HF_DIR --out FILE`: save HF logits for a later `ckptflow verify --golden`."""

import argparse
import sys

DESCRIPTION = """\
Run the Hugging Face model on the verification prompts and save the logits as JSON lines (one object
per prompt: prompt, tokens, logits [positions][vocab]; MaxText's golden-logits format). Use it where
the HF model can run, then `ckptflow verify --golden FILE --maxtext CKPT` where the MaxText
checkpoint is. Files are large on real vocabularies (~13 bytes per logit: ~1 GB for the default
prompts on a 150k vocabulary).

examples:
  ckptflow golden --hf ./Qwen3-0.6B --out qwen3.golden.jsonl
  ckptflow golden --hf ./Llama-3.1-8B --out llama.golden.jsonl --prompts my_prompts.txt
"""


def add_parser(sub):
    from converters.verify.run import DTYPE_CHOICES

    p = sub.add_parser(
        "golden",
        help="save HF logits for verify --golden",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--hf", required=True, metavar="HF_DIR", help="the Hugging Face model folder")
    p.add_argument("--out", required=True, metavar="FILE", help="golden file to write (.jsonl)")
    p.add_argument("--prompts", metavar="FILE", help="prompts instead of the defaults (as for verify)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="dtype of the HF model (default float32)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the token ids used when there is no tokenizer (default 0)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    return p


def run(args) -> int:
    from converters.cli.commands.verify import setup_logging
    from converters.verify.run import make_golden

    setup_logging(args.quiet)
    path = make_golden(hf=args.hf, out=args.out, prompts_file=args.prompts, dtype=args.dtype, seed=args.seed)
    print(f"wrote golden logits: {path}", file=sys.stderr)
    return 0
