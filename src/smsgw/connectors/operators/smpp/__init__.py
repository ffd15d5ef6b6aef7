"""SMPP 3.4, the I/O-free half: PDUs and their codec, text encoding and splitting, command
statuses, send-rate control, addresses and delivery receipts. The connection (trio) uses these.
"""

from smsgw.connectors.operators.smpp.aimd import AimdRate
from smsgw.connectors.operators.smpp.encoding import Part, split
from smsgw.connectors.operators.smpp.pdu import (
    FramingError,
    Pdu,
    PduError,
    PduReader,
    decode,
    encode,
)
from smsgw.connectors.operators.smpp.receipt import Receipt, parse_receipt, receipt_from_pdu
from smsgw.connectors.operators.smpp.status import CommandStatus, StatusClass, classify

__all__ = [
    "AimdRate",
    "CommandStatus",
    "FramingError",
    "Part",
    "Pdu",
    "PduError",
    "PduReader",
    "Receipt",
    "StatusClass",
    "classify",
    "decode",
    "encode",
    "parse_receipt",
    "receipt_from_pdu",
    "split",
]
