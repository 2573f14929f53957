"""``protos.pack``: equal messages give equal bytes, whatever order their map fields were filled in (a
control plane restarted from the same cluster must serve the same versions: tests/e2e/test_cp_restart.py)."""

from __future__ import annotations

from google.protobuf import any_pb2, struct_pb2

from trafficmgr.core.protos import pack


def _struct(keys: list[str]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    for k in keys:
        s.fields[k].string_value = k
    return s


def test_pack_is_deterministic_for_map_fields() -> None:
    keys = [f"pod-{i}.default" for i in range(40)]
    one, other = _struct(keys), _struct(list(reversed(keys)))
    assert one == other
    assert pack(one).value == pack(other).value
    loose = any_pb2.Any()
    loose.Pack(one)  # what pack did before: the insertion order leaks into the bytes
    tight = any_pb2.Any()
    tight.Pack(other)
    assert loose.value != tight.value, "the non-deterministic Pack no longer differs: this test proves nothing"
