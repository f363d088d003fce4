"""exporter.grpc_messages.parse: its one-look unknown-field check of the message types
without nested messages against the general one (measure, discard, measure again)."""

from __future__ import annotations

from collections import Counter

from google.protobuf.message import DecodeError, Message
from hypothesis import given
from hypothesis import strategies as st

from exporter.events import CallEnded, Method
from exporter.grpc_messages import _FLAT, RPCS, parse
from exporter.proto import step_pb2

FLAT_TYPES = sorted(_FLAT, key=lambda cls: cls.DESCRIPTOR.name)


class Counts:
    def __init__(self) -> None:
        self.decode_errors: Counter[str] = Counter()
        self.unknown: Counter[str] = Counter()

    def call_started(self, method: Method) -> None:
        raise AssertionError("parse reports no calls")

    def call_ended(self, call: CallEnded) -> None:
        raise AssertionError("parse reports no calls")

    def decode_error(self, message: str) -> None:
        self.decode_errors[message] += 1

    def unknown_fields(self, message: str) -> None:
        self.unknown[message] += 1


def _general_check(cls: type[Message], payload: bytes) -> bool | None:
    """Whether the message carries unknown fields, by the general check; None when it
    does not decode."""
    message = cls()
    try:
        message.ParseFromString(payload)
    except DecodeError:
        return None
    size = message.ByteSize()
    message.DiscardUnknownFields()
    return message.ByteSize() != size


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@st.composite
def wire_fields(draw: st.DrawFn) -> bytes:
    """One field of any number and wire type: known fields with their own or another
    wire type, unknown ones, empty ones."""
    number = draw(st.one_of(st.integers(1, 8), st.integers(9, (1 << 29) - 1)))
    kind = draw(st.sampled_from((0, 1, 2, 5)))
    tag = _varint(number << 3 | kind)
    if kind == 0:
        return tag + _varint(draw(st.integers(0, (1 << 64) - 1)))
    if kind == 1:
        return tag + draw(st.binary(min_size=8, max_size=8))
    if kind == 5:
        return tag + draw(st.binary(min_size=4, max_size=4))
    body = draw(st.binary(max_size=12))
    return tag + _varint(len(body)) + body


@given(
    cls=st.sampled_from(FLAT_TYPES),
    fields=st.lists(wire_fields(), max_size=5),
    tail=st.binary(max_size=3),
)
def test_flat_types_count_unknown_fields_as_the_general_check_does(
    cls: type[Message], fields: list[bytes], tail: bytes
) -> None:
    payload = b"".join(fields) + tail
    counts = Counts()
    message = parse(cls, payload, counts)
    expected = _general_check(cls, payload)
    name = cls.DESCRIPTOR.name
    assert (message is None) == (expected is None)
    assert counts.decode_errors == (Counter({name: 1}) if expected is None else Counter())
    assert counts.unknown == (Counter({name: 1}) if expected else Counter())


def test_only_types_without_nested_messages_take_the_one_look() -> None:
    every = {cls for rpc in RPCS.values() for cls in (rpc.request, rpc.response)}
    # Run's request has a map and a Job; Status's response has its Status entries.
    assert every - _FLAT == {step_pb2.RunRequest, step_pb2.StatusResponse}
    # An unknown field two levels down in a nested type is still found.
    job = b"\x2a\x03\xa0\x06\x01"  # RunRequest.job = Job{field 100: 1}
    counts = Counts()
    assert parse(step_pb2.RunRequest, b"\x0a\x01j" + job, counts) is not None
    assert counts.unknown == Counter({"RunRequest": 1})
