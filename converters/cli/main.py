"""`ckptflow` command line: one subcommand per module in `converters.cli.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from converters import __version__
from converters.cli.commands import COMMANDS
from converters.errors import CkptflowError

DESCRIPTION = """\
Convert LLM checkpoints between Hugging Face safetensors and MaxText (Orbax), streaming tensor by
tensor in bounded memory, and prove the result by comparing logits.

typical use:
  ckptflow models                                    # what can be converted
  ckptflow convert ./Llama-3.1-8B ./llama-mt --to maxtext --scan
  ckptflow verify --hf ./Llama-3.1-8B --maxtext ./llama-mt
  ckptflow convert ./llama-mt ./llama-hf --to hf     # back, config and tokenizer included

Run `ckptflow COMMAND --help` for each command's options and examples.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ckptflow",
        description=DESCRIPTION,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"ckptflow {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show library logs (Orbax, JAX) and full tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        mod = importlib.import_module(f"converters.cli.commands.{name}")
        sp = mod.add_parser(sub)
        sp.set_defaults(_run=mod.run)
    return p


def _quiet_libraries() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Orbax logs a failed background write (with its traceback) before raising it; the error line says it once.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.FATAL)
    except ImportError:
        pass


EXIT_CODES = """\
exit status: 0 success; 1 verification failed (verify/golden); 2 bad input or arguments;
3 out of memory; 4 internal error; 130 interrupted.
"""


def main(argv: list[str] | None = None) -> int:
    from converters.io.malloc import fix_mmap_threshold

    fix_mmap_threshold()  # before any tensor is allocated
    args = build_parser().parse_args(argv)
    if not args.verbose:
        _quiet_libraries()
    try:
        return int(args._run(args) or 0)
    except CkptflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written at the destination", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        return 3
    except OSError as e:
        if args.verbose:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug or an unexpected library failure: distinct from "verification failed" (1)
        if args.verbose:
            raise
        print(
            f"error: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(run with -v for the traceback)",
            file=sys.stderr,
        )
        return 4
