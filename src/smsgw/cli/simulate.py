"""`smsgw simulate` and `smsgw bench`: the simulation harness (smsgw.simulate), which needs
the simulator's extra packages."""

from __future__ import annotations

import argparse
from typing import Any

from smsgw.cli.common import ENV_DATABASE, Subcommands, UsageError


def add_commands(sub: Any, command: Subcommands) -> None:
    """`simulate` and `bench` under `sub`."""
    simulate = command(
        sub,
        "simulate",
        ENV_DATABASE,
        help="run a load scenario (virtual time, or a real node on the wall clock) and report",
    )
    simulate.add_argument(
        "scenario",
        nargs="?",
        default="smoke",
        choices=["smoke", "production-test", "day", "whale", "outage"],
        help="default smoke",
    )
    simulate.add_argument("--mode", choices=["virtual", "wall"], help="default: the scenario's")
    simulate.add_argument("--scale", type=float, default=1.0, help="messages and accounts x")
    simulate.add_argument("--seed", type=int, help="default: the scenario's")
    simulate.add_argument("--out", help="report folder (default var/reports/SCENARIO-TIME)")
    simulate.add_argument("--no-progress", action="store_true", help="no progress display")
    simulate.add_argument("--accounts", type=int, help="override the scenario's accounts")
    simulate.add_argument("--messages", type=int, help="override the scenario's messages")
    simulate.add_argument("--connections", type=int, help="wall clock: concurrent clients")
    simulate.add_argument("--credit", type=int, help="credit per account (default: from need)")
    simulate.add_argument("--express-share", type=float, help="override the express share")
    simulate.add_argument(
        "--timeout", type=float, help="wall clock: seconds to wait for final states (300)"
    )
    simulate.set_defaults(func=_simulate)

    bench = command(
        sub, "bench", ENV_DATABASE, help="run benchmarks/ and the simulator; one report"
    )
    bench.add_argument(
        "set",
        nargs="?",
        default="quick",
        choices=["quick", "full"],
        help="which jobs: quick (minutes) or full (default quick)",
    )
    bench.add_argument("--out", help="report folder (default benchmarks/reports/latest)")
    bench.add_argument(
        "--only", nargs="*", metavar="WORD", help="run only jobs whose name contains a word"
    )
    bench.set_defaults(func=_bench)


def _need_sim_extra(command: str) -> None:
    """A one-line UsageError when the simulator's packages are not installed (a node's own
    install leaves them out: they are the `sim` extra)."""
    import importlib.util

    missing = [m for m in ("numpy", "matplotlib", "rich") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"`smsgw {command}` needs the simulator's packages ({', '.join(missing)} missing):"
            " pip install 'smsgw[sim]' (./dev installs them)"
        )


def _simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    _need_sim_extra("simulate")
    from smsgw.simulate.run import Overrides, run

    overrides = Overrides(
        accounts=args.accounts,
        messages=args.messages,
        connections=args.connections,
        credit=args.credit,
        express_share=args.express_share,
        final_timeout=args.timeout,
    )
    report, _ = run(
        args.scenario,
        mode=args.mode,
        scale=args.scale,
        seed=args.seed,
        out=Path(args.out) if args.out else None,
        live=not args.no_progress,
        overrides=overrides,
    )
    return 0 if report.passed else 1


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    _need_sim_extra("bench")

    from smsgw.simulate.bench import DEFAULT_OUT, run

    return run(args.set, Path(args.out) if args.out else DEFAULT_OUT, only=args.only)
