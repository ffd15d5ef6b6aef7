"""The import contracts of pyproject.toml ([tool.importlinter]): they hold for the source tree,
each one fails on an import that crosses it, and every engine module is public or protected."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
# The engine's modules anything may import (pyproject.toml says why); each of the others must
# be protected by a contract, so a new engine module is classified when it is added.
ENGINE_PUBLIC = {"ports", "messages", "credit", "sms", "numbers", "otp", "netguard", "histogram"}


def lint_imports(src: Path, cwd: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """lint-imports with the project's contracts, over the `smsgw` package found in `src`."""
    args = [str(LINT_IMPORTS), "--no-cache", "--config", str(CONFIG)]
    for contract in contracts:
        args += ["--contract", contract]
    return subprocess.run(
        args,
        cwd=cwd,
        # PYTHONPATH goes ahead of the editable install's path, so the package analysed is the
        # one in `src`; COLUMNS keeps each contract's name and verdict on one line.
        env={**os.environ, "PYTHONPATH": str(src), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def contract_names() -> dict[str, str]:
    config = tomllib.loads(CONFIG.read_text())["tool"]["importlinter"]
    return {c["id"]: c["name"] for c in config["contracts"]}


def test_the_source_tree_keeps_every_contract(tmp_path: Path) -> None:
    done = lint_imports(ROOT / "src", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Contracts: {len(contract_names())} kept, 0 broken." in done.stdout


@pytest.mark.parametrize(
    ("module", "forbidden", "contract"),
    [
        # The engine reaching up into storage.
        ("engine/sms.py", "from smsgw.storage import ledger", "engine"),
        # A store using the Scheduler's internals instead of the ports.
        ("storage/ledger.py", "from smsgw.engine import scheduler", "engine-internals"),
        # An operator adapter calling an actor.
        ("connectors/operators/wire.py", "from smsgw.engine import node", "engine-handle"),
        # Storage and http are peers: neither imports the other.
        ("storage/ledger.py", "from smsgw.http import problems", "layers"),
        # The client library is a library of its own.
        ("client/errors.py", "from smsgw.engine import messages", "client"),
        # messages imports actor (Reply): the other way round closes a circle.
        ("engine/actor.py", "from smsgw.engine import messages", "no-circles"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, forbidden: str, contract: str
) -> None:
    src = tmp_path / "src"
    shutil.copytree(
        ROOT / "src" / "smsgw", src / "smsgw", ignore=shutil.ignore_patterns("__pycache__")
    )
    with (src / "smsgw" / module).open("a") as f:
        f.write(f"\n{forbidden}\n")
    done = lint_imports(src, tmp_path, contract)
    assert done.returncode != 0
    assert f"{contract_names()[contract]} BROKEN" in done.stdout, done.stdout + done.stderr


def test_every_engine_module_is_public_or_protected() -> None:
    config = tomllib.loads(CONFIG.read_text())["tool"]["importlinter"]
    protected = {
        module.removeprefix("smsgw.engine.")
        for c in config["contracts"]
        if c["type"] == "protected"
        for module in c["protected_modules"]
    }
    modules = {p.stem for p in (ROOT / "src" / "smsgw" / "engine").glob("*.py")} - {"__init__"}
    assert modules - protected - ENGINE_PUBLIC == set()
    assert protected & ENGINE_PUBLIC == set()
