"""An SMPP operator's settings, as its `smpp://` URL gives them."""

from __future__ import annotations

from typing import Any, Final, Literal, NamedTuple
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import msgspec

from smsgw.connectors.operators.smpp.encoding import Method

DEFAULT_PORT: Final = 2775


class SmppConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One SMPP operator, as its URL gives it (see `parse_smpp_url`)."""

    host: str
    port: int = DEFAULT_PORT
    system_id: str
    password: str = ""
    system_type: str = ""
    binds: int = 1
    window: int = 10
    tps: float = 100.0  # per bind: an operator's capacity is tps x binds
    bind: Literal["trx", "tx+rx"] = "trx"
    enquire_link: float = 30.0
    gsm7: Literal["packed", "unpacked"] = "unpacked"
    split: Method = "udh"
    timeout: float = 10.0  # seconds for any response (bind, submit_sm, enquire_link)


_INT_LIMITS = {"binds": (1, 64), "window": (1, 10_000)}
_FLOAT_LIMITS = {"tps": (0.1, 1e6), "enquire_link": (1.0, 3600.0), "timeout": (0.05, 600.0)}
_CHOICES: dict[str, tuple[str, ...]] = {
    "bind": ("trx", "tx+rx"),
    "gsm7": ("packed", "unpacked"),
    "split": ("udh", "sar", "payload"),
}


def parse_smpp_url(url: str) -> SmppConfig:
    """`smpp://SYSTEM_ID:PASSWORD@HOST[:PORT]?binds=2&window=10&tps=500&system_type=&
    bind=trx|tx+rx&enquire_link=30&gsm7=packed|unpacked&split=udh|sar|payload&timeout=10`.

    User and password are percent-decoded. Every parameter is optional, at most once;
    an unknown one, a value out of range or a field too long for its PDU field (system_id
    15, password 8, system_type 12 characters) is a ValueError that says which.
    """
    parts = urlsplit(url)
    if parts.scheme != "smpp":
        raise ValueError(f"an SMPP operator URL starts with smpp://, not {url!r}")
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError(f"{url!r}: an SMPP URL has no path or fragment")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"{url!r}: the port is not a number from 0 to 65535") from None
    fields: dict[str, Any] = {
        "host": parts.hostname,
        "port": port,
        "system_id": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
    }
    if not fields["system_id"]:
        raise ValueError(f"{url!r}: no system_id (smpp://SYSTEM_ID:PASSWORD@HOST:PORT)")
    seen: set[str] = set()
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key in seen:
            raise ValueError(f"{url!r}: {key} given twice")
        seen.add(key)
        if key in _INT_LIMITS:
            low, high = _INT_LIMITS[key]
            if not (value.isdigit() and low <= int(value) <= high):
                raise ValueError(f"{key}={value!r}: want a whole number from {low} to {high}")
            fields[key] = int(value)
        elif key in _FLOAT_LIMITS:
            low_f, high_f = _FLOAT_LIMITS[key]
            try:
                number = float(value)
            except ValueError:
                number = float("nan")
            if not low_f <= number <= high_f:
                raise ValueError(f"{key}={value!r}: want a number from {low_f:g} to {high_f:g}")
            fields[key] = number
        elif key in _CHOICES:
            if value not in _CHOICES[key]:
                raise ValueError(f"{key}={value!r}: want one of {', '.join(_CHOICES[key])}")
            fields[key] = value
        elif key == "system_type":
            fields[key] = value
        else:
            raise ValueError(f"{url!r}: unknown parameter {key!r}")
    for name, most in (("system_id", 15), ("password", 8), ("system_type", 12)):
        value = fields.get(name, "")
        if len(value) > most or not value.isascii():
            raise ValueError(f"{name} {value!r}: at most {most} ASCII characters")
    return SmppConfig(**fields)


def operator_name(config: SmppConfig) -> str:
    """The name an SMPP operator gets when its URL names none: `smpp:SYSTEM_ID@HOST:PORT`."""
    return f"smpp:{config.system_id}@{config.host}:{config.port}"


class BindShare(NamedTuple):
    """What one of several node processes on one `serve` opens to an SMPP operator."""

    url: str  # the operator's URL with this process's binds and tps
    binds: int
    tps: float  # per bind


def share_binds(url: str, worker: int, workers: int) -> BindShare:
    """Worker `worker`'s share of an SMPP operator whose URL gives the gateway's binds and
    per-bind tps (the operator's contract: a bind over it is refused, PDUs over it are
    throttled): the binds dealt out in turn, so `workers` processes open `binds` sessions in
    all, not `workers` x `binds`. With fewer binds than workers each still binds once (a node
    without a session could not send its messages), and the tps is lowered so that the total
    stays tps x binds. ValueError for a URL `parse_smpp_url` refuses."""
    config = parse_smpp_url(url)
    if config.binds >= workers:
        binds = config.binds // workers + (1 if worker < config.binds % workers else 0)
        tps = config.tps
    else:
        binds = 1
        tps = config.tps * config.binds / workers
    parts = urlsplit(url)
    given = parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, v) for k, v in given if k not in ("binds", "tps")]
    query += [("binds", str(binds)), ("tps", repr(tps))]
    return BindShare(urlunsplit(parts._replace(query=urlencode(query))), binds, tps)
