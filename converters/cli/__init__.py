"""The `ckptflow` command line: one module per subcommand under `commands/`."""
