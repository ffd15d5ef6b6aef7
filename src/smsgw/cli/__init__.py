"""The `smsgw` command line (the `smsgw` console script is `main`), one module per command
group: serve (its flags in serve_options), database (migrate, accounts), simulate (simulate,
bench); command builds the parser and runs a command, common holds what they share."""

from smsgw.cli.command import build_parser, main

__all__ = ["build_parser", "main"]
