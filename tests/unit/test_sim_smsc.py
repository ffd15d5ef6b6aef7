"""The simulated SMSC's frames, written in one step, are the codec's."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from smsgw.connectors.operators.smpp.pdu import DeliverSm, SubmitSmResp, Tlvs, decode, encode
from smsgw.sim.smsc import receipt_frame, submit_sm_resp_frame

_message_ids = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=64)


@given(st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 0x08, 0x14, 0x58]), _message_ids)
def test_a_submit_sm_resp_is_what_the_codec_writes(seq: int, status: int, message_id: str) -> None:
    message_id = "" if status else message_id
    resp = SubmitSmResp(sequence_number=seq, command_status=status, message_id=message_id)
    assert submit_sm_resp_frame(seq, status, message_id.encode("ascii")) == encode(resp)


@given(
    st.text("0123456789abcdef", min_size=1, max_size=16),
    st.booleans(),
    st.sampled_from(["2612061812", "0001010000"]),
    st.booleans(),
)
def test_a_receipt_is_what_the_codec_writes(
    message_id: str, delivered: bool, stamp: str, tlvs: bool
) -> None:
    stat, err = ("DELIVRD", "000") if delivered else ("UNDELIV", "001")
    text = (
        f"id:{message_id} sub:001 dlvrd:{'001' if delivered else '000'} "
        f"submit date:{stamp} done date:{stamp} stat:{stat} err:{err} text:"
    )
    want = DeliverSm(
        sequence_number=0,
        esm_class=0x04,
        short_message=text.encode("ascii"),
        tlvs=(
            Tlvs(receipted_message_id=message_id, message_state=2 if delivered else 5)
            if tlvs
            else Tlvs()
        ),
    )
    frame = receipt_frame(message_id, delivered, stamp, tlvs=tlvs)
    assert frame == encode(want)
    assert decode(frame) == want
