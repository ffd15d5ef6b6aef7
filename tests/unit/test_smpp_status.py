"""SMPP command_status classification, and AimdRate, the throttle-driven send rate."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smsgw.connectors.operators.smpp.aimd import AimdRate
from smsgw.connectors.operators.smpp.status import CommandStatus as S
from smsgw.connectors.operators.smpp.status import StatusClass, classify, status_name

SETTINGS = settings(max_examples=200, deadline=None)


def test_ok() -> None:
    assert classify(S.ESME_ROK) == StatusClass("ok")


@pytest.mark.parametrize("status", [S.ESME_RTHROTTLED, S.ESME_RMSGQFUL])
def test_a_full_operator_is_temporary_and_slows_the_bind(status: int) -> None:
    assert classify(status) == StatusClass("temporary", throttle=True)
    assert int(status) in (0x58, 0x14)


@pytest.mark.parametrize(
    "status",
    [
        S.ESME_RINVDSTADR,
        S.ESME_RINVSRCADR,
        S.ESME_RINVDSTTON,
        S.ESME_RINVDSTNPI,
        S.ESME_RINVSRCTON,
        S.ESME_RINVSRCNPI,
        S.ESME_RINVESMCLASS,
        S.ESME_RINVMSGLEN,
        S.ESME_RINVDCS,
        S.ESME_RINVOPTPARAMVAL,
        S.ESME_RX_P_APPN,
        S.ESME_RX_R_APPN,
    ],
)
def test_what_is_wrong_with_the_message_itself_is_permanent(status: int) -> None:
    assert classify(status) == StatusClass("permanent")


@pytest.mark.parametrize(
    "status",
    [
        S.ESME_RSYSERR,
        S.ESME_RX_T_APPN,
        S.ESME_RSUBMITFAIL,
        S.ESME_RINVBNDSTS,  # our bind is not bound: the message may go on another
        S.ESME_RUNKNOWNERR,
        0x00000400,  # vendor-specific
        0x000004A1,
        0x12345678,
    ],
)
def test_system_errors_and_unknown_codes_are_temporary(status: int) -> None:
    assert classify(status) == StatusClass("temporary")


def test_every_named_code_has_a_class_and_only_rok_is_ok() -> None:
    for status in S:
        kind = classify(status).kind
        assert (kind == "ok") == (status is S.ESME_ROK)
        assert classify(status).throttle == (status in (S.ESME_RTHROTTLED, S.ESME_RMSGQFUL))


def test_the_table_holds_the_spec_values() -> None:
    assert S.ESME_RINVCMDLEN == 0x02
    assert S.ESME_RINVCMDID == 0x03
    assert S.ESME_RSYSERR == 0x08
    assert S.ESME_RINVSRCADR == 0x0A
    assert S.ESME_RINVDSTADR == 0x0B
    assert S.ESME_RINVESMCLASS == 0x43
    assert S.ESME_RINVOPTPARSTREAM == 0xC0
    assert S.ESME_RUNKNOWNERR == 0xFF
    assert len({int(s) for s in S}) == len(S)


def test_status_names() -> None:
    assert status_name(0x58) == "ESME_RTHROTTLED"
    assert status_name(0) == "ESME_ROK"
    assert status_name(0x400) == "0x00000400"


# --- AimdRate -------------------------------------------------------------------------------


def test_aimd_starts_at_the_ceiling_and_halves_on_throttle() -> None:
    rate = AimdRate(100, floor=5, step=10)
    assert rate.rate == 100
    assert rate.on_throttle(now=0.0) == 50
    assert rate.on_throttle(now=1.0) == 25


def test_aimd_halves_once_for_a_burst_of_throttles() -> None:
    rate = AimdRate(100, floor=5, step=10, interval=1.0)
    for t in (0.0, 0.1, 0.5, 0.99):  # a window of PDUs sent at the old rate, answered together
        rate.on_throttle(now=t)
    assert rate.rate == 50
    assert rate.on_throttle(now=1.0) == 25


def test_aimd_never_goes_below_the_floor() -> None:
    rate = AimdRate(100, floor=30, step=10)
    for t in range(10):
        rate.on_throttle(now=float(t))
    assert rate.rate == 30


def test_aimd_climbs_one_step_per_interval_of_success_up_to_the_ceiling() -> None:
    rate = AimdRate(100, floor=5, step=10, interval=1.0)
    rate.on_throttle(now=0.0)  # 50
    assert rate.on_success(now=0.5) == 50  # within the interval of the decrease
    assert rate.on_success(now=1.0) == 60
    assert rate.on_success(now=1.5) == 60  # one step per interval, not per response
    assert rate.on_success(now=2.0) == 70
    for t in range(3, 20):
        rate.on_success(now=float(t))
    assert rate.rate == 100


def test_aimd_refuses_a_floor_above_the_ceiling() -> None:
    with pytest.raises(ValueError):
        AimdRate(10, floor=20)
    with pytest.raises(ValueError):
        AimdRate(10, floor=0)


@SETTINGS
@given(
    st.floats(1, 10_000),
    st.floats(0.01, 1),
    st.lists(st.tuples(st.booleans(), st.floats(0, 5)), max_size=200),
)
def test_aimd_stays_between_floor_and_ceiling(
    ceiling: float, floor_share: float, events: list[tuple[bool, float]]
) -> None:
    rate = AimdRate(ceiling, floor=ceiling * floor_share)
    now = 0.0
    for throttled, gap in events:
        now += gap
        before = rate.rate
        after = rate.on_throttle(now) if throttled else rate.on_success(now)
        assert rate.floor <= after <= rate.ceiling
        assert (after <= before) if throttled else (after >= before)
