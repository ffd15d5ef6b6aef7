"""The SMPP client's pure parts: its URL, receipts as delivery reports, results of parts."""

from __future__ import annotations

import argparse

import pytest

from smsgw.cli.serve import _operator_shares
from smsgw.cli.serve_options import _operator_url
from smsgw.connectors.operators.http import HttpOperator
from smsgw.connectors.operators.smpp import session
from smsgw.connectors.operators.smpp.client import SmppOperator
from smsgw.connectors.operators.smpp.config import (
    SmppConfig,
    operator_name,
    parse_smpp_url,
    share_binds,
)
from smsgw.connectors.operators.smpp.receipt import parse_receipt, report_for
from smsgw.connectors.operators.smpp.session import Job, Round, Shared
from smsgw.engine.messages import DeliveryReport, SendResult
from smsgw.runtime.server import default_providers


def test_a_full_url() -> None:
    config = parse_smpp_url(
        "smpp://acme%40x:p%3Ass@127.0.0.1:2776?binds=2&window=10&tps=500&system_type=VMA"
        "&bind=tx%2Brx&enquire_link=15&gsm7=packed&split=sar&timeout=2.5"
    )
    assert config == SmppConfig(
        host="127.0.0.1",
        port=2776,
        system_id="acme@x",
        password="p:ss",
        system_type="VMA",
        binds=2,
        window=10,
        tps=500.0,
        bind="tx+rx",
        enquire_link=15.0,
        gsm7="packed",
        split="sar",
        timeout=2.5,
    )


def test_defaults() -> None:
    config = parse_smpp_url("smpp://acme:pw@localhost")
    assert (config.port, config.binds, config.window, config.bind) == (2775, 1, 10, "trx")
    assert (config.gsm7, config.split, config.system_type) == ("unpacked", "udh", "")
    assert operator_name(config) == "smpp:acme@localhost:2775"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://acme:pw@h:1", "smpp://"),
        ("smpp://h:1", "system_id"),
        ("smpp://acme:pw@:1", "no host"),
        ("smpp://acme:pw@h:1/path", "no path"),
        ("smpp://acme:pw@h:99999", "port"),
        ("smpp://acme:pw@h:1?binds=0", "binds"),
        ("smpp://acme:pw@h:1?binds=x", "binds"),
        ("smpp://acme:pw@h:1?window=100000", "window"),
        ("smpp://acme:pw@h:1?tps=0", "tps"),
        ("smpp://acme:pw@h:1?tps=nan", "tps"),
        ("smpp://acme:pw@h:1?bind=rx", "bind"),
        ("smpp://acme:pw@h:1?split=mms", "split"),
        ("smpp://acme:pw@h:1?gsm7=7bit", "gsm7"),
        ("smpp://acme:pw@h:1?speed=3", "unknown parameter 'speed'"),
        ("smpp://acme:pw@h:1?binds=1&binds=2", "twice"),
        ("smpp://acme:longpassword@h:1", "password"),
        ("smpp://a_system_id_too_long:pw@h:1", "system_id"),
        ("smpp://acme:pw@h:1?system_type=thirteen_char", "system_type"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_smpp_url(url)


def test_serve_builds_smpp_and_http_operators_by_scheme() -> None:
    providers = default_providers(
        (), ("A=smpp://acme:pw@127.0.0.1:2775?binds=3", "B=http://127.0.0.1:9", "smpp://x@h")
    )
    a, b, c = (p for p, _ in providers)
    assert isinstance(a, SmppOperator) and a.name == "A" and len(a.sessions) == 3
    assert isinstance(b, HttpOperator) and b.name == "B"
    assert isinstance(c, SmppOperator) and c.name == "smpp:x@h:2775"
    tx_rx = default_providers((), ("A=smpp://acme@h?binds=2&bind=tx%2Brx",))[0][0]
    assert isinstance(tx_rx, SmppOperator)
    assert [s.role for s in tx_rx.sessions] == ["tx", "rx", "tx", "rx"]


def test_the_command_line_checks_smpp_urls() -> None:
    assert _operator_url("A=smpp://acme:pw@h:1?binds=2") == "A=smpp://acme:pw@h:1?binds=2"
    with pytest.raises(argparse.ArgumentTypeError, match="binds"):
        _operator_url("A=smpp://acme:pw@h:1?binds=0")
    with pytest.raises(argparse.ArgumentTypeError, match="smpp://"):
        _operator_url("A=ftp://h")


@pytest.mark.parametrize(
    ("binds", "workers", "dealt", "tps"),
    [(4, 2, [2, 2], 500.0), (3, 2, [2, 1], 500.0), (5, 3, [2, 2, 1], 500.0), (1, 2, [1, 1], 250.0)],
)
def test_serve_deals_an_operators_binds_out_among_its_workers(
    binds: int, workers: int, dealt: list[int], tps: float
) -> None:
    """The URL's binds and tps are the operator's contract for the whole gateway: `serve
    --workers N` opens `binds` sessions in all, not N x binds (a bind over the contract is
    refused). With fewer binds than workers each binds once, at a tps that keeps the total."""
    url = f"smpp://ac%40me:p%3Aw@127.0.0.1:2775?window=50&binds={binds}&tps=500&split=sar"
    shares = [share_binds(url, i, workers) for i in range(workers)]
    assert [s.binds for s in shares] == dealt
    for share in shares:
        config = parse_smpp_url(share.url)
        assert (config.binds, config.tps) == (share.binds, tps)
        assert (config.system_id, config.password) == ("ac@me", "p:w")
        assert (config.window, config.split) == (50, "sar")
        assert operator_name(config) == operator_name(parse_smpp_url(url))
    assert sum(s.binds * s.tps for s in shares) == binds * 500.0
    args = _operator_shares([f"A={url}", "B=http://127.0.0.1:9"], workers)
    assert [a[1].partition("?")[0] for a in args] == [f"A={url.partition('?')[0]}"] * workers
    assert [parse_smpp_url(a[1][2:]).binds for a in args] == dealt
    assert all(a[2:] == ["--operator-url", "B=http://127.0.0.1:9"] for a in args)


RECEIPT = "id:{} sub:001 dlvrd:000 submit date:2412011200 done date:2412011201 stat:{} err:{} text:"


def receipt(message_id: str, stat: str, err: str = "000") -> object:
    parsed = parse_receipt(RECEIPT.format(message_id, stat, err))
    assert parsed is not None
    return parsed


@pytest.mark.parametrize(
    ("stat", "want"),
    [
        ("DELIVRD", DeliveryReport("1a2b", "delivered")),
        ("UNDELIV", DeliveryReport("1a2b", "undelivered", "UNDELIV err:034")),
        ("EXPIRED", DeliveryReport("1a2b", "undelivered", "EXPIRED err:034")),
        ("REJECTD", DeliveryReport("1a2b", "undelivered", "REJECTD err:034")),
        ("ENROUTE", None),
        ("WHATEVER", None),
    ],
)
def test_receipts_become_delivery_reports(stat: str, want: DeliveryReport | None) -> None:
    assert report_for(receipt("1A2B", stat, "034"), {}) == want  # type: ignore[arg-type]


def test_a_receipt_takes_the_id_form_that_was_sent_and_skips_later_parts() -> None:
    # Sent as hex 0x1f4 = 500, receipted in decimal: reported under the id the gateway stored.
    assert report_for(receipt("500", "DELIVRD"), {"1f4": True}) == DeliveryReport(  # type: ignore[arg-type]
        "1f4", "delivered"
    )
    # The receipt of a message's second part: answered, not forwarded.
    assert report_for(receipt("1f5", "DELIVRD"), {"1f5": False}) is None  # type: ignore[arg-type]


def finished(*statuses: tuple[str, str, str | None]) -> list[Job]:
    jobs = []
    round_ = Round(len(statuses))
    for index, (status, message_id, reason) in enumerate(statuses):
        job = Job(b"", first=index == 0)
        job.round = round_
        job.finish(status, message_id=message_id, reason=reason)  # type: ignore[arg-type]
        jobs.append(job)
    assert round_.done.is_set()
    return jobs


def test_a_message_is_sent_when_every_part_is_and_carries_the_first_parts_id() -> None:
    jobs = finished(("ok", "00AB", None), ("ok", "AC", None))
    assert SmppOperator._result(jobs) == SendResult("sent", "ab")


def test_a_refused_part_decides_the_message() -> None:
    temporary = ("temporary", "", "smpp_status:ESME_RSYSERR")
    permanent = ("permanent", "", "smpp_status:ESME_RINVDSTADR")
    assert SmppOperator._result(finished(("ok", "1", None), temporary)) == SendResult(
        "temporary", reason="smpp_status:ESME_RSYSERR"
    )
    assert SmppOperator._result(finished(temporary, permanent)) == SendResult(
        "permanent", reason="smpp_status:ESME_RINVDSTADR"
    )


def test_the_ids_sent_lately_drop_the_oldest_first_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session, "RECENT_IDS", 3)
    shared = Shared(
        parse_smpp_url("smpp://a:b@127.0.0.1"),
        "op",
        on_receipts=None,
        receipt_linger=0.0,
        reconnect_base=0.1,
        reconnect_cap=1.0,
    )
    for message_id in ("a", "b", "c", "d"):
        shared.remember(message_id, True)
    assert shared.recent == {"b": True, "c": True, "d": True}
    shared.remember("b", False)  # sent again: its place is still its first sending's
    shared.remember("e", True)
    assert shared.recent == {"c": True, "d": True, "e": True}
    # A receipt of an id that fell out is still reported, under the id it carries.
    assert report_for(receipt("a", "DELIVRD"), shared.recent) == DeliveryReport("a", "delivered")  # type: ignore[arg-type]
