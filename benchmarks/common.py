"""Helpers the benchmark scripts share: servers as subprocesses, accounts, the load generator,
a database, durability checks and reports.

Every benchmark runs its servers and its load generator as separate processes, one phase
after another, and only ever against 127.0.0.1. Scripts in this folder import this module as
`common` (the folder is on sys.path when a script is run as `python benchmarks/NAME.py`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import queue
import re
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import msgspec
import psutil

from smsgw.sim.loadgen import LoadReport

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_DIR = REPO_ROOT / "benchmarks"
LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so `finally` blocks stop the child processes."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def log(message: str) -> None:
    """Progress goes to stderr; stdout is kept for the one JSON result."""
    print(message, file=sys.stderr, flush=True)


# --- Run metadata ---------------------------------------------------------------------------


def git_commit() -> str:
    return _git("rev-parse", "--short", "HEAD") or "unknown"


def git_dirty() -> bool:
    """Whether the working tree differs from the commit (the numbers may not be the commit's)."""
    return bool(_git("status", "--porcelain", "--untracked-files=no"))


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def utc_timestamp() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- PostgreSQL -----------------------------------------------------------------------------


@contextmanager
def database(work_dir: Path) -> Iterator[tuple[str, str]]:
    """(url, source): DATABASE_URL when set, else an embedded PostgreSQL in `work_dir` that is
    stopped and deleted on exit. `source` is "DATABASE_URL" or "embedded"."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url, "DATABASE_URL"
        return
    from smsgw.storage.embedded import start_embedded

    log(f"starting an embedded PostgreSQL in {work_dir}")
    server = start_embedded(work_dir / "pgdata", cleanup="delete")
    try:
        yield str(server.get_uri("postgres")), "embedded"
    finally:
        server.cleanup()


def fresh_schema(prefix: str) -> str:
    """A new schema name, so each phase starts from empty tables."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    _check_schema(name)
    return name


def _check_schema(name: str) -> None:
    if not _SCHEMA_NAME.match(name):
        raise ValueError(f"bad schema name {name!r}")


def drop_schema(url: str, schema: str) -> None:
    _check_schema(schema)

    async def drop() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()

    asyncio.run(drop())


# A node that has run for its retention (90 days by default) holds that many day partitions
# of `messages` and of `message_events`; a fresh schema holds yesterday's to a week ahead.
# Statements that a cached plan would keep over every partition cost more the more there are,
# so `--past-days` makes the days before yesterday first, empty (migration 019's function).
_PAST_PARTITIONS = """
SELECT count(smsgw_add_day_partition(t.parent, d::date)) FROM day_partitioned t
CROSS JOIN generate_series((now() AT TIME ZONE 'UTC')::date - $1::int,
                           (now() AT TIME ZONE 'UTC')::date - 2, interval '1 day') AS d
"""


def add_past_partitions(url: str, schema: str, days: int) -> int:
    """Make the day partitions of the `days` days up to the day before yesterday in `schema`
    (already migrated); returns how many partitions were made."""
    _check_schema(schema)

    async def add() -> int:
        conn = await asyncpg.connect(url, server_settings={"search_path": schema})
        try:
            return int(await conn.fetchval(_PAST_PARTITIONS, days))
        finally:
            await conn.close()

    return asyncio.run(add()) if days > 0 else 0


class Durability(msgspec.Struct):
    """Whether every id that got a 202 is in the messages table."""

    ids: int  # lines in the ids file: one per 202 response, warmup included
    unique: int
    stored: int  # how many of the unique ids are in `messages`
    missing: int
    durable: bool


def check_durable(url: str, schema: str, ids_file: Path) -> Durability:
    ids = [line for line in ids_file.read_text().splitlines() if line]
    unique = sorted(set(ids))
    _check_schema(schema)

    async def count() -> int:
        conn = await asyncpg.connect(url)
        try:
            found = await conn.fetchval(
                f"SELECT count(*) FROM {schema}.messages WHERE id = ANY($1::uuid[])", unique
            )
        finally:
            await conn.close()
        return int(found)

    stored = asyncio.run(count()) if unique else 0
    missing = len(unique) - stored
    return Durability(
        ids=len(ids),
        unique=len(unique),
        stored=stored,
        missing=missing,
        durable=missing == 0 and len(unique) == len(ids),
    )


# --- Servers as subprocesses ----------------------------------------------------------------


class Server:
    """A server subprocess that announced {"event": "listening", "url": ...} on stdout."""

    def __init__(self, process: subprocess.Popen[str], url: str, log_path: Path) -> None:
        self.process = process
        self.url = url
        self.log_path = log_path


@contextmanager
def run_server(
    command: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = READY_TIMEOUT_S,
) -> Iterator[Server]:
    """Start `command`, wait for its listening line, and stop it (SIGTERM, then SIGKILL after
    a grace period) when the block exits, whatever happens. Its stderr goes to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            list(command),
            cwd=REPO_ROOT,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
        try:
            url = _wait_listening(process, ready_timeout, log_path)
            yield Server(process, url, log_path)
        finally:
            stop_process(process)


def _wait_listening(process: subprocess.Popen[str], timeout: float, log_path: Path) -> str:
    """Read stdout until the listening line; a thread keeps draining it afterwards so the
    server can never block on a full pipe."""
    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"no listening line within {timeout:g} s; see {log_path}")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            raise RuntimeError(
                f"server exited ({process.wait()}) before listening; see {log_path}:\n"
                + tail(log_path)
            )
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "listening":
            url = str(event["url"])
            if urlsplit(url).hostname != LOOPBACK:
                raise RuntimeError(f"server listens on {url}, not on {LOOPBACK}")
            return url


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def stop_process(process: subprocess.Popen[Any], grace: float = STOP_GRACE_S) -> int:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(grace)
        except subprocess.TimeoutExpired:
            log(f"pid {process.pid} ignored SIGTERM for {grace:g} s; killing it")
            process.kill()
    return process.wait()


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def gateway_command(*extra: str, workers: int = 1) -> list[str]:
    """One node (`--workers 1`: `serve` runs one per core by default), or `workers` nodes on
    one port, on a free port."""
    command = [sys.executable, "-m", "smsgw.cli", "serve", "--workers", str(workers)]
    # No access log: a line a request is the operator's choice, not the engine's cost.
    return [*command, "--host", LOOPBACK, "--port", "0", "--no-access-log", *extra]


def gateway_env(database_url: str, schema: str, admin_key: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "SMSGW_SCHEMA": schema,
        "SMSGW_ADMIN_KEY": admin_key,
    }


@contextmanager
def run_gateway(
    database_url: str, schema: str, *, admin_key: str, log_path: Path
) -> Iterator[Server]:
    """`smsgw serve` on 127.0.0.1 and a free port, its tables in `schema`."""
    env = gateway_env(database_url, schema, admin_key)
    with run_server(gateway_command(), log_path=log_path, env=env) as server:
        yield server


@contextmanager
def run_noop_server(log_path: Path) -> Iterator[Server]:
    """benchmarks/noop_server.py: the same HTTP stack with a handler that does nothing."""
    command = [sys.executable, str(BENCHMARKS_DIR / "noop_server.py"), "--host", LOOPBACK]
    with run_server(command, log_path=log_path) as server:
        yield server


def new_admin_key() -> str:
    return "adm_" + secrets.token_urlsafe(24)


def create_accounts(
    url: str,
    admin_key: str,
    count: int,
    *,
    credit: int,
    name_prefix: str = "bench",
    settings: dict[str, Any] | None = None,
) -> list[str]:
    """Create `count` accounts through the HTTP API, with `settings` (PUT
    /v1/accounts/{id}/settings) when given; returns their API keys."""
    keys: list[str] = []
    headers = {"Authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30.0) as client:
        for i in range(count):
            response = client.post(
                "/v1/accounts", json={"name": f"{name_prefix}-{i}", "credit": credit}
            )
            response.raise_for_status()
            created = response.json()
            keys.append(str(created["api_key"]))
            if settings is not None:
                client.put(
                    f"/v1/accounts/{created['id']}/settings", json=settings
                ).raise_for_status()
    return keys


# --- profiles -------------------------------------------------------------------------------


def start_profile(pid: int, seconds: float, out_file: Path) -> subprocess.Popen[bytes] | None:
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        log("py-spy is not installed next to this python: no profile")
        return None
    # Blocking mode (the default): py-spy pauses the process for each sample, which costs a
    # few percent, where --nonblocking reads torn stacks that lose their callers.
    command = [str(py_spy), "record", "-p", str(pid), "-d", str(int(seconds)), "-f", "raw"]
    command += ["-o", str(out_file)]
    return subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


class DelayedProfile:
    """py-spy on `pid` for `seconds`, starting `delay` seconds from now (from a timer thread,
    while the caller blocks on its load); `finish()` waits for it and returns the summary, or
    None when py-spy is missing or failed."""

    def __init__(self, pid: int, delay: float, seconds: float, out_file: Path) -> None:
        self._out_file = out_file
        self._seconds = seconds
        self._process: subprocess.Popen[bytes] | None = None
        self._timer = threading.Timer(delay, self._start, args=(pid,))
        self._timer.daemon = True
        self._timer.start()

    def _start(self, pid: int) -> None:
        self._process = start_profile(pid, self._seconds, self._out_file)

    def finish(self) -> dict[str, Any] | None:
        self._timer.cancel()
        self._timer.join()
        process = self._process
        if process is None:
            return None
        try:
            process.wait(self._seconds + 30)
            return summarize_profile(self._out_file)
        except (subprocess.TimeoutExpired, OSError) as exc:
            log(f"no profile: {exc}")
            return None
        finally:
            stop_process(process, grace=2)


def summarize_profile(raw_file: Path, top: int = 15) -> dict[str, Any]:
    """From py-spy's raw (collapsed stack) output, `frame;frame;... count` with frames as
    `func (file:line)`: the top inclusive frames in smsgw code (the entry point's frames, in
    every sample, left out), the top self frames anywhere, and self time by package."""
    inclusive: dict[str, int] = {}
    leaves: dict[str, int] = {}
    packages: dict[str, int] = {}
    total = 0
    for line in raw_file.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame_name(f) for f in stack.split(";")]
        for frame in set(frames):
            if "smsgw/" in frame and "smsgw/cli/" not in frame:
                inclusive[frame] = inclusive.get(frame, 0) + count
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + count
        package = _package(frames[-1])
        packages[package] = packages.get(package, 0) + count

    def ranked(counts: dict[str, int], n: int = top) -> list[dict[str, Any]]:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
        return [{"frame": f, "percent": round(100.0 * c / total, 1)} for f, c in best]

    return {
        "samples": total,
        "file": str(raw_file),
        "inclusive_smsgw": ranked(inclusive) if total else [],
        "self_top": ranked(leaves) if total else [],
        "self_by_package": (
            {p["frame"]: p["percent"] for p in ranked(packages, 12)} if total else {}
        ),
    }


def _package(frame: str) -> str:
    """`func (smsgw/engine/pool.py)` -> `smsgw.engine`; `f (trio/_core/_run.py)` -> `trio`."""
    path = frame.rpartition(" (")[2].rstrip(")")
    parts = path.split("/")
    if parts[0] == "smsgw" and len(parts) > 2:
        return f"smsgw.{parts[1]}"
    if len(parts) > 1:
        return parts[0]
    return "stdlib" if path.endswith(".py") or path.startswith("<") else path


def _frame_name(frame: str) -> str:
    """`func (/path/to/src/smsgw/engine/pool.py:123)` -> `func (smsgw/engine/pool.py)`."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("/src/smsgw/", "/site-packages/"):
        if marker in path:
            path = ("smsgw/" if "smsgw" in marker else "") + path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


# --- CPU use --------------------------------------------------------------------------------


class CpuUse(msgspec.Struct):
    """CPU used during a measured block, in percent of one core (a 2-core machine tops at 200).

    `machine` counts every process, including PostgreSQL and anything else running on the
    machine: when it is far above server + loadgen + the database's share, other work
    competed with the benchmark. `server` is None when its process could not be read."""

    wall_s: float
    server: float | None
    loadgen: float | None
    machine: float | None
    loadavg_1m_before: float | None


class CpuMeter:
    """Measure CPU use of a server process, of the children reaped meanwhile (the load
    generator) and of the whole machine, between `start()` and `stop()`."""

    def __init__(self, server_pid: int | None) -> None:
        self._pid = server_pid
        self._wall = 0.0
        self._server: float | None = None
        self._children = 0.0
        self._machine: float | None = None
        self._loadavg: float | None = None

    def start(self) -> None:
        self._loadavg = _loadavg_1m()
        self._wall = time.monotonic()
        self._server = _process_cpu_s(self._pid)
        self._children = _children_cpu_s()
        self._machine = _machine_busy_s()

    def stop(self) -> CpuUse:
        wall = time.monotonic() - self._wall
        server = _delta(_process_cpu_s(self._pid), self._server)
        machine = _delta(_machine_busy_s(), self._machine)
        loadgen = _children_cpu_s() - self._children

        def percent(seconds: float | None) -> float | None:
            return None if seconds is None or wall <= 0 else round(100.0 * seconds / wall, 1)

        return CpuUse(
            wall_s=round(wall, 3),
            server=percent(server),
            loadgen=percent(loadgen),
            machine=percent(machine),
            loadavg_1m_before=self._loadavg,
        )


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def _process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process and its live descendants (`serve
    --workers N` runs its nodes as children); None when it is gone or not ours to read."""
    if pid is None:
        return None
    try:
        process = psutil.Process(pid)
        times = [process.cpu_times()]
        for child in process.children(recursive=True):
            try:
                times.append(child.cpu_times())
            except psutil.Error:
                continue  # ended meanwhile
    except psutil.Error:
        return None
    return sum(t.user + t.system for t in times)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _machine_busy_s() -> float:
    """CPU seconds all cores spent on anything but idle and iowait."""
    times = psutil.cpu_times()
    # Linux counts guest time in user and nice as well: once is enough.
    guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    return sum(times) - times.idle - getattr(times, "iowait", 0.0) - guest


def _loadavg_1m() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# --- Load generator -------------------------------------------------------------------------


def operator_server_command(*flags: str) -> list[str]:
    """The command line of a simulated HTTP operator (`python -m smsgw.sim.operator_server`)
    on a free loopback port, with `flags`."""
    return [
        sys.executable,
        "-m",
        "smsgw.sim.operator_server",
        "--host",
        LOOPBACK,
        "--port",
        "0",
        *flags,
    ]


def loadgen_command(url: str, keys_file: Path, *flags: str) -> list[str]:
    """The command line of `python -m smsgw.sim.loadgen` against `url` with the API keys in
    `keys_file` (a JSON list) and `flags`."""
    return [
        sys.executable,
        "-m",
        "smsgw.sim.loadgen",
        "--url",
        url,
        "--keys",
        str(keys_file),
        *flags,
    ]


def run_loadgen(
    url: str,
    keys: Sequence[str],
    *,
    connections: int,
    duration: float,
    warmup: float,
    ids_out: Path | None = None,
    extra_args: Sequence[str] = (),
) -> LoadReport:
    """Run `python -m smsgw.sim.loadgen` in its own process: `warmup` seconds unmeasured, then
    `duration` measured seconds. Returns its report."""
    if urlsplit(url).hostname != LOOPBACK:
        raise ValueError(f"load only targets {LOOPBACK}, not {url}")
    with tempfile.TemporaryDirectory(prefix="smsgw-bench-keys-") as tmp:
        keys_file = Path(tmp) / "keys.json"
        keys_file.write_text(json.dumps(list(keys)))
        command = loadgen_command(
            url,
            keys_file,
            "--connections",
            str(connections),
            # The generator's duration includes its warmup.
            "--duration",
            str(warmup + duration),
            "--warmup",
            str(warmup),
            *(["--ids-out", str(ids_out)] if ids_out is not None else []),
            *extra_args,
        )
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
        )
        try:
            stdout, _ = process.communicate(timeout=warmup + duration + 60)
        finally:
            stop_process(process, grace=5)
    if process.returncode != 0:
        raise RuntimeError(f"the load generator failed with exit code {process.returncode}")
    return msgspec.json.decode(stdout.strip().splitlines()[-1], type=LoadReport)


# --- Reports --------------------------------------------------------------------------------


def write_report(out_dir: Path, name: str, result: Mapping[str, Any], markdown: str) -> Path:
    """Write `<name>.json` and `<name>.md` into `out_dir`; returns the JSON file's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown)
    return json_path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def auth(key: str) -> dict[str, str]:
    """The Authorization header of an API or admin key."""
    return {"Authorization": f"Bearer {key}"}


@contextmanager
def loadgen(
    url: str, keys_file: Path, ids_file: Path, rate: float, duration: float, *extra: str
) -> Iterator[subprocess.Popen[str]]:
    """`python -m smsgw.sim.loadgen --rate` against `url` for `duration` seconds, in a process
    of its own (`extra`: more of its flags), every 202's id written to `ids_file`."""
    command = loadgen_command(
        url,
        keys_file,
        "--duration",
        str(duration),
        "--rate",
        str(rate),
        "--timeout",
        "10",
        "--ids-out",
        str(ids_file),
        *extra,
    )
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
    )
    try:
        yield process
    finally:
        stop_process(process, grace=5)


def load_report(process: subprocess.Popen[str], timeout: float) -> LoadReport | None:
    """The load generator's report once it ends (None: it failed or outlived `timeout`)."""
    try:
        stdout, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    lines = stdout.strip().splitlines()
    if process.returncode != 0 or not lines:
        return None
    return msgspec.json.decode(lines[-1], type=LoadReport)
