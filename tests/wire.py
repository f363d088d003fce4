"""Hand-built HTTP/2 and gRPC bytes shared by the tests that talk raw HTTP/2."""

from __future__ import annotations

import struct


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame: 24-bit length, type, flags, stream id, payload."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([ftype, flags])
        + struct.pack(">I", stream)
        + payload
    )


def grpc_message(payload: bytes, flag: int = 0) -> bytes:
    """One gRPC length-prefixed message (flag 1: compressed)."""
    return bytes([flag]) + struct.pack(">I", len(payload)) + payload


def request_headers(path: str, timeout: str | None = None) -> list[tuple[str, str]]:
    """The request headers a gRPC client sends, as hpack.Encoder input."""
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    if timeout is not None:
        headers.append(("grpc-timeout", timeout))
    return headers


def varint(value: int) -> bytes:
    """A protobuf varint; negative int32/int64 values are ten-byte two's complement."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
