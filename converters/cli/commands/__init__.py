"""Subcommands of `ckptflow`; each module has `add_parser(subparsers)` and `run(args) -> int`."""

COMMANDS = ["models", "convert", "inspect", "make_test_model", "verify", "golden", "download", "publish"]
