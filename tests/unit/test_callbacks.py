"""Callback signatures and URL rules; the simulated operator's delivery report draws."""

from __future__ import annotations

import hashlib
import hmac

import pytest
import trio

from smsgw.engine.callbacks import callback_url_problem, sign, verify
from smsgw.sim.dlr import DlrEmitter, DlrProfile


def test_the_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"message_id":"m","status":"sent"}'
    expected = hmac.new(b"whsec_k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("whsec_k", 1_700_000_000, body) == "sha256=" + expected
    assert verify("whsec_k", "1700000000", body, "sha256=" + expected)
    assert not verify("whsec_k", "1700000001", body, "sha256=" + expected)
    assert not verify("whsec_other", "1700000000", body, "sha256=" + expected)
    assert not verify("whsec_k", "1700000000", body + b" ", "sha256=" + expected)
    assert not verify("whsec_k", "-1", body, "sha256=" + expected)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/cb",
        "https://127.0.0.1:8443/a/b?c=d",
        "http://[::1]:9000/",
        "http://localhost/cb",
        "http://127.10.0.3/cb",
    ],
)
def test_loopback_urls_are_taken_only_outside_production(url: str) -> None:
    assert callback_url_problem(url, production=False) is None
    problem = callback_url_problem(url, production=True)
    assert problem is not None and ("loopback" in problem or "local" in problem)


@pytest.mark.parametrize(
    "url",
    ["https://hooks.example.com/sms", "http://8.8.8.8/cb", "http://[2606:4700:4700::1111]:8443/"],
)
def test_public_hosts_only_in_production(url: str) -> None:
    problem = callback_url_problem(url, production=False)
    assert problem is not None and "loopback" in problem
    assert callback_url_problem(url, production=True) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/cb",
        "http://[fd00:ec2::254]/",
        "http://0x7f000001/",
        "http://[::ffff:127.0.0.1]/",
        "http://metadata.google.internal/computeMetadata/v1/",
    ],
)
def test_production_refuses_forbidden_hosts_and_says_why(url: str) -> None:
    problem = callback_url_problem(url, production=True)
    assert problem is not None and "public" in problem


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/x",
        "javascript:alert(1)",
        "127.0.0.1/cb",
        "http://",
        "http://user:pw@127.0.0.1/",
        "http://127.0.0.1:70000/",
        "http://127.0.0.1/a b",
        "http://127.0.0.1/" + "x" * 2_000,
    ],
)
def test_bad_urls_are_refused_everywhere(url: str) -> None:
    assert callback_url_problem(url, production=True) is not None
    assert callback_url_problem(url, production=False) is not None


async def test_reports_are_drawn_at_the_ratio_and_come_due_after_their_delay(
    autojump_clock: trio.abc.Clock,
) -> None:
    profile = DlrProfile(delivered_ratio=0.8, delay_ms_median=100, delay_ms_p99=1_000, batch=500)
    emitter = DlrEmitter("sim", profile)
    for i in range(5_000):
        emitter.schedule(f"sim-{i}")
    assert emitter._due() == []  # nothing is due at once
    await trio.sleep(0.1)
    early = emitter._due()
    assert 0 < len(early) <= 500  # about half are due after the median, in batches of 500
    await trio.sleep(60)
    rest = []
    while batch := emitter._due():
        rest.extend(batch)
    drawn = early + rest
    assert len(drawn) == 5_000
    delivered = sum(1 for entry in drawn if entry[3] == "delivered")
    assert abs(delivered - 4_000) < 150  # binomial sd is about 28
    assert all(entry[4] is None for entry in drawn if entry[3] == "delivered")
    assert all(entry[4] for entry in drawn if entry[3] == "undelivered")


def test_only_loopback_gateways() -> None:
    emitter = DlrEmitter("sim", DlrProfile())
    with pytest.raises(ValueError):
        emitter.set_target("http://example.com", "k")
    emitter.set_target("http://127.0.0.1:8080/", "k")
