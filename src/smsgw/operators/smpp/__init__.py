"""SMPP 3.4, the I/O-free half: PDUs and their codec, command statuses, send-rate control.
The connection (trio) uses these.
"""

from smsgw.operators.smpp.aimd import AimdRate
from smsgw.operators.smpp.pdu import FramingError, Pdu, PduError, PduReader, decode, encode
from smsgw.operators.smpp.status import CommandStatus, StatusClass, classify

__all__ = [
    "AimdRate",
    "CommandStatus",
    "FramingError",
    "Pdu",
    "PduError",
    "PduReader",
    "StatusClass",
    "classify",
    "decode",
    "encode",
]
