"""`ckptflow make-test-model FAMILY OUT`: a tiny random model of a family's real architecture."""

import argparse

from converters.tiny_models import TINY

DESCRIPTION = """\
Build a small random model of FAMILY with transformers (real architecture, tiny dimensions) and
save it as safetensors in OUT, ready for `ckptflow convert`. Handy for trying the pipeline without
downloading anything.

example:
  ckptflow make-test-model qwen3 /tmp/tiny-qwen3 --layers 4
"""


def add_parser(sub):
    p = sub.add_parser(
        "make-test-model",
        help="build a tiny random HF model of a family",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("family", metavar="FAMILY", choices=sorted(TINY), help=f"one of: {', '.join(sorted(TINY))}")
    p.add_argument("out", metavar="OUT", help="folder to write")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size (default 512)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tied",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tie embeddings (default: as the family's small sizes)",
    )
    return p


def run(args) -> int:
    from converters.tiny_models import make_test_model

    print(
        make_test_model(
            args.family,
            args.out,
            layers=args.layers,
            vocab=args.vocab,
            dtype=args.dtype,
            seed=args.seed,
            tied=args.tied,
        )
    )
    return 0
