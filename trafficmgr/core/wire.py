"""Minimal protobuf wire encoding, used to assemble xDS responses from pre-serialized resource bytes.

Resources are serialized once; every response is a concatenation of cached bytes plus a few small fields
(protobuf parsers accept fields in any order, and repeated fields may be split across the message).
"""

from __future__ import annotations


def varint(value: int) -> bytes:
    """Base-128 varint of a non-negative integer."""
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def field(number: int, data: bytes) -> bytes:
    """A length-delimited field (wire type 2): bytes, string or sub-message."""
    return varint((number << 3) | 2) + varint(len(data)) + data


def field_str(number: int, text: str) -> bytes:
    """A string field; empty strings are omitted as proto3 does."""
    return field(number, text.encode()) if text else b""
