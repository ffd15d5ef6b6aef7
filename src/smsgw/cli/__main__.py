"""`python -m smsgw.cli`: the `smsgw` command, run by a given interpreter (tests, benchmarks,
and `serve --workers N`, which starts its workers this way)."""

import sys

from smsgw.cli.command import main

if __name__ == "__main__":
    sys.exit(main())
