"""SMPP command_status: every code by name, and what each one means for the message sent."""

from __future__ import annotations

from enum import IntEnum
from typing import Literal

import msgspec


class CommandStatus(IntEnum):
    """The command_status codes of SMPP 3.4 (section 5.1.3), and the SMPP 5.0 codes 0x100 to
    0x106, which SMSCs speaking 3.4 send too."""

    ESME_ROK = 0x00
    ESME_RINVMSGLEN = 0x01
    ESME_RINVCMDLEN = 0x02
    ESME_RINVCMDID = 0x03
    ESME_RINVBNDSTS = 0x04
    ESME_RALYBND = 0x05
    ESME_RINVPRTFLG = 0x06
    ESME_RINVREGDLVFLG = 0x07
    ESME_RSYSERR = 0x08
    ESME_RINVSRCADR = 0x0A
    ESME_RINVDSTADR = 0x0B
    ESME_RINVMSGID = 0x0C
    ESME_RBINDFAIL = 0x0D
    ESME_RINVPASWD = 0x0E
    ESME_RINVSYSID = 0x0F
    ESME_RCANCELFAIL = 0x11
    ESME_RREPLACEFAIL = 0x13
    ESME_RMSGQFUL = 0x14
    ESME_RINVSERTYP = 0x15
    ESME_RINVNUMDESTS = 0x33
    ESME_RINVDLNAME = 0x34
    ESME_RINVDESTFLAG = 0x40
    ESME_RINVSUBREP = 0x42
    ESME_RINVESMCLASS = 0x43
    ESME_RCNTSUBDL = 0x44
    ESME_RSUBMITFAIL = 0x45
    ESME_RINVSRCTON = 0x48
    ESME_RINVSRCNPI = 0x49
    ESME_RINVDSTTON = 0x50
    ESME_RINVDSTNPI = 0x51
    ESME_RINVSYSTYP = 0x53
    ESME_RINVREPFLAG = 0x54
    ESME_RINVNUMMSGS = 0x55
    ESME_RTHROTTLED = 0x58
    ESME_RINVSCHED = 0x61
    ESME_RINVEXPIRY = 0x62
    ESME_RINVDFTMSGID = 0x63
    ESME_RX_T_APPN = 0x64
    ESME_RX_P_APPN = 0x65
    ESME_RX_R_APPN = 0x66
    ESME_RQUERYFAIL = 0x67
    ESME_RINVOPTPARSTREAM = 0xC0
    ESME_ROPTPARNOTALLWD = 0xC1
    ESME_RINVPARLEN = 0xC2
    ESME_RMISSINGOPTPARAM = 0xC3
    ESME_RINVOPTPARAMVAL = 0xC4
    ESME_RDELIVERYFAILURE = 0xFE
    ESME_RUNKNOWNERR = 0xFF
    # SMPP 5.0
    ESME_RSERTYPUNAUTH = 0x100
    ESME_RPROHIBITED = 0x101
    ESME_RSERTYPUNAVAIL = 0x102
    ESME_RSERTYPDENIED = 0x103
    ESME_RINVDCS = 0x104
    ESME_RINVSRCADDRSUBUNIT = 0x105
    ESME_RINVDSTADDRSUBUNIT = 0x106


_S = CommandStatus

# Sending the same message again would fail the same way: something about the message itself
# (its addresses, coding, length, flags) or a standing refusal of it.
_PERMANENT = frozenset(
    {
        _S.ESME_RINVMSGLEN,
        _S.ESME_RINVPRTFLG,
        _S.ESME_RINVREGDLVFLG,
        _S.ESME_RINVSRCADR,
        _S.ESME_RINVDSTADR,
        _S.ESME_RINVSERTYP,
        _S.ESME_RINVNUMDESTS,
        _S.ESME_RINVDLNAME,
        _S.ESME_RINVDESTFLAG,
        _S.ESME_RINVSUBREP,
        _S.ESME_RINVESMCLASS,
        _S.ESME_RCNTSUBDL,
        _S.ESME_RINVSRCTON,
        _S.ESME_RINVSRCNPI,
        _S.ESME_RINVDSTTON,
        _S.ESME_RINVDSTNPI,
        _S.ESME_RINVREPFLAG,
        _S.ESME_RINVNUMMSGS,
        _S.ESME_RINVSCHED,
        _S.ESME_RINVEXPIRY,
        _S.ESME_RINVDFTMSGID,
        _S.ESME_RX_P_APPN,
        _S.ESME_RX_R_APPN,
        _S.ESME_RINVOPTPARSTREAM,
        _S.ESME_ROPTPARNOTALLWD,
        _S.ESME_RINVPARLEN,
        _S.ESME_RMISSINGOPTPARAM,
        _S.ESME_RINVOPTPARAMVAL,
        _S.ESME_RSERTYPUNAUTH,
        _S.ESME_RPROHIBITED,
        _S.ESME_RSERTYPDENIED,
        _S.ESME_RINVDCS,
        _S.ESME_RINVSRCADDRSUBUNIT,
        _S.ESME_RINVDSTADDRSUBUNIT,
    }
)
# The operator is full: retry later, and slow this bind down.
_THROTTLE = frozenset({_S.ESME_RTHROTTLED, _S.ESME_RMSGQFUL})


class StatusClass(msgspec.Struct, frozen=True):
    """What a response's command_status means for the message it answers.

    kind: `ok` (accepted), `temporary` (another attempt may succeed: on this bind later, or
    on another one), or `permanent` (the same message would be refused again).
    throttle: the operator asks this bind to send more slowly (see AimdRate).
    """

    kind: Literal["ok", "temporary", "permanent"]
    throttle: bool = False


_OK = StatusClass("ok")
_TEMPORARY = StatusClass("temporary")
_PERMANENT_CLASS = StatusClass("permanent")
_THROTTLED = StatusClass("temporary", throttle=True)


def classify(command_status: int) -> StatusClass:
    """Classify a response's command_status. Codes not named here (ESME_RSYSERR, the
    vendor-specific range 0x400-0x4FF, anything unknown) are temporary: a retry costs a
    PDU, while a wrong permanent failure loses a message the customer paid for."""
    if command_status == _S.ESME_ROK:
        return _OK
    if command_status in _THROTTLE:
        return _THROTTLED
    if command_status in _PERMANENT:
        return _PERMANENT_CLASS
    return _TEMPORARY


def status_name(command_status: int) -> str:
    """The spec's name for a code ("ESME_RTHROTTLED"), or its hex form ("0x00000400")."""
    try:
        return CommandStatus(command_status).name
    except ValueError:
        return f"0x{command_status:08X}"
