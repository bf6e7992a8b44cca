"""The wire format: round trips for every allowed dtype and odd shape, and garbage that must raise FramingError."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from zpipe.errors import FramingError
from zpipe.framing import MAGIC, Kind, Limits, Message, aligned_empty, decode, encode

ALLOWED = ["?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"]


def roundtrip(tensors, **kw):
    msg = Message(kind=Kind.REQUEST, request_id=7, tensors=tensors, **kw)
    return decode([bytes(memoryview(f)) for f in encode(msg)])


@pytest.mark.parametrize("dtype", ALLOWED + [">f4", ">i8", "<u2", ">c8"])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 4), (2, 3, 4), (1,) * 8])
def test_roundtrip_table(dtype, shape):
    rng = np.random.default_rng(0)
    array = np.asarray(rng.standard_normal(shape) * 100).astype(dtype)
    out = roundtrip({"t": array}).tensors["t"]
    assert out.dtype == array.dtype  # byte order included
    assert out.dtype.str == np.dtype(dtype).str
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    assert not out.flags.writeable


def test_noncontiguous_is_made_contiguous_on_purpose():
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    for view in (base.T, base[:, ::2], base[::-1]):
        out = roundtrip({"v": view}).tensors["v"]
        np.testing.assert_array_equal(out, view)
        assert out.flags.c_contiguous


def test_encode_does_not_copy_contiguous_arrays():
    array = np.arange(1 << 16, dtype=np.float32)
    frames = encode(Message(kind=Kind.REQUEST, request_id=1, tensors={"a": array}))
    assert np.shares_memory(np.frombuffer(frames[2], dtype=np.float32), array)


def test_decode_returns_views_of_frames():
    payload = bytearray(np.arange(16, dtype=np.int32).tobytes())
    frames = encode(Message(kind=Kind.REPLY, request_id=3, tensors={"a": np.zeros(16, np.int32)}))
    frames[2] = memoryview(payload)
    out = decode(frames).tensors["a"]
    payload[0] = 99  # the decoded array sees the frame's memory: no copy was made
    assert out[0] == 99


def test_header_cache_keeps_meta_and_validation_apart():
    x = np.zeros(3, np.float32)
    for meta in ({}, {"a": 1}, {}, {"b": [1, 2]}):
        msg = decode(encode(Message(kind=Kind.REQUEST, request_id=9, tensors={"x": x}, meta=meta)))
        assert msg.meta == meta and msg.tensors["x"].shape == (3,)
    strict = Limits(max_tensor_bytes=8)
    frames = encode(Message(kind=Kind.REQUEST, request_id=9, tensors={"x": x}))
    decode(frames)  # cached under the default limits...
    with pytest.raises(FramingError, match="exceeds 8 bytes"):
        decode(frames, strict)  # ...but not under stricter ones


def test_cached_header_hands_each_message_its_own_meta():
    frames = encode(Message(kind=Kind.REQUEST, request_id=9, meta={"model": "m", "timeout_ms": 5, "ok": True}))
    first = decode(frames)
    first.meta["model"] = "changed"  # a receiver may change its meta...
    second = decode(frames)  # ...the same header bytes decoded again (a cache hit) are not affected
    assert second.meta == {"model": "m", "timeout_ms": 5, "ok": True} and type(second.meta["ok"]) is bool
    with_list = encode(Message(kind=Kind.REQUEST, request_id=9, meta={"ids": [1, 2]}))
    decode(with_list).meta["ids"].append(3)
    assert decode(with_list).meta == {"ids": [1, 2]}  # lists are never shared between messages


def test_meta_and_kinds_survive():
    for kind in Kind:
        msg = decode(encode(Message(kind=kind, request_id=2**63 - 1, meta={"op": "x", "t": [1.5, 2.0], "n": None})))
        assert msg.kind == kind and msg.request_id == 2**63 - 1
        assert msg.meta == {"op": "x", "t": [1.5, 2.0], "n": None}


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(dtype=st.sampled_from(ALLOWED + [">f8", ">i4"]),
                  shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)),
       st.booleans())
def test_roundtrip_property(array, transpose):
    if transpose:
        array = array.T
    out = roundtrip({"x": array}).tensors["x"]
    assert out.dtype.str == array.dtype.str and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("bad, match", [
    (np.array([object()]), "cannot travel"),
    (np.array(["abc"]), "cannot travel"),
    (np.zeros(2, dtype="M8[s]"), "cannot travel"),
    (np.zeros(2, dtype=[("a", "i4")]), "cannot travel"),
    ([1, 2, 3], "expected a numpy array"),
])
def test_encode_rejects_what_cannot_travel(bad, match):
    with pytest.raises(FramingError, match=match):
        encode(Message(kind=Kind.REQUEST, request_id=1, tensors={"bad": bad}))


def test_encode_limits():
    limits = Limits(max_tensors=2, max_tensor_bytes=16, max_ndim=2)
    with pytest.raises(FramingError, match="3 tensors"):
        encode(Message(kind=Kind.REQUEST, request_id=1, tensors={k: np.zeros(1) for k in "abc"}), limits)
    with pytest.raises(FramingError, match="24 bytes"):
        encode(Message(kind=Kind.REQUEST, request_id=1, tensors={"a": np.zeros(3)}), limits)
    with pytest.raises(FramingError, match="3 dimensions"):
        encode(Message(kind=Kind.REQUEST, request_id=1, tensors={"a": np.zeros((1, 1, 1))}), limits)
    with pytest.raises(FramingError, match="request id"):
        encode(Message(kind=Kind.REQUEST, request_id=-1))


def good_frames():
    return [bytes(memoryview(f)) for f in encode(Message(
        kind=Kind.REQUEST, request_id=5, tensors={"x": np.arange(6, dtype="<f4").reshape(2, 3)}))]


def header(**over):
    doc = {"t": [["x", "<f4", [2, 3]]], "m": {}}
    doc.update(over)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("mutate, match", [
    (lambda f: f[:1], "at least 2 frames"),
    (lambda f: [b"XX" + f[0][2:]] + f[1:], "bad magic"),
    (lambda f: [MAGIC + b"\x09" + f[0][3:]] + f[1:], "protocol version 9"),
    (lambda f: [MAGIC + b"\x01\x63" + f[0][4:]] + f[1:], "unknown message kind 99"),
    (lambda f: [MAGIC + b"\x01\x01" + b"\xff" * 8] + f[1:], "request id 18446744073709551615 is out of range"),
    (lambda f: [b"ZP"] + f[1:], "prefix frame must be 12 bytes"),
    (lambda f: [f[0], b"\xff\xfe"] + f[2:], "not valid UTF-8 JSON"),
    (lambda f: [f[0], b"[" * 100_000] + f[2:], "header is 100000 bytes"),
    (lambda f: [f[0], b"[" * 60_000] + f[2:], "JSON"),
    (lambda f: [f[0], b"[]"] + f[2:], "must be an object"),
    (lambda f: [f[0], header(m=[])] + f[2:], "meta must be an object"),
    (lambda f: [f[0], header(m={"k": {"deep": 1}})] + f[2:], "JSON scalar"),
    (lambda f: [f[0], header(t=[["x", "|O", [2, 3]]])] + f[2:], "dtype '\\|O'"),
    (lambda f: [f[0], header(t=[["x", "<U4", [2, 3]]])] + f[2:], "dtype"),
    (lambda f: [f[0], header(t=[["x", "f4", [2, 3]]])] + f[2:], "dtype"),
    (lambda f: [f[0], header(t=[["x", "|f4", [2, 3]]])] + f[2:], "dtype '\\|f4'"),
    (lambda f: [f[0], header(t=[["x", "<f16", [2, 3]]])] + f[2:], "dtype '<f16'"),  # long double: not portable
    (lambda f: [f[0], header(t=[["x", "<f1", [2, 3]]])] + f[2:], "dtype '<f1'"),
    (lambda f: [f[0], header(t=[["x", "<i16", [2, 3]]])] + f[2:], "dtype '<i16'"),
    (lambda f: [f[0], header(t=[["x", "<f4", [0, 10**30]]])] + f[:1], "ints in"),
    (lambda f: [f[0], header(t=[["x", "<f4", [0] + [2**32] * 6]])] + [f[0], b""][1:], "unusable|exceeds"),
    (lambda f: [f[0], header(t=[["x", "<f4", [2, -3]]])] + f[2:], "ints in"),
    (lambda f: [f[0], header(t=[["x", "<f4", [2, 3.0]]])] + f[2:], "ints in"),
    (lambda f: [f[0], header(t=[["x", "<f4", [1] * 40]])] + f[2:], "at most 32"),
    (lambda f: [f[0], header(t=[["x", "<f4", [2**20, 2**20]]])] + f[2:], "exceeds"),
    (lambda f: [f[0], header(t=[["x", "<f4", [2, 4]]])] + f[2:], "needs 32 bytes, frame has 24"),
    (lambda f: [f[0], header(t=[["x", "<f4"]])] + f[2:], r"\[name, dtype, shape\]"),
    (lambda f: [f[0], header(t=[["", "<f4", [2, 3]]])] + f[2:], "bad tensor name"),
    (lambda f: [f[0], header(t=[["x", "<f4", [2, 3]], ["x", "<f4", [0]]])] + f[2:] + [b""], "appears twice"),
    (lambda f: f + [b"extra"], "2 tensor frames"),
    (lambda f: f[:2], "0 tensor frames"),
    (lambda f: [f[0], header(extra=1)] + f[2:], "keys"),
])
def test_decode_garbage_names_the_fault(mutate, match):
    with pytest.raises(FramingError, match=match):
        decode(mutate(good_frames()))


def test_strided_buffer_frame_is_a_framing_error():
    frames = good_frames()
    frames[2] = memoryview(bytes(48)).cast("B")[::2]
    with pytest.raises(FramingError, match="contiguous"):
        decode(frames)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=6))
def test_random_garbage_only_raises_framing_error(frames):
    try:
        decode(frames)
    except FramingError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 5), st.binary(min_size=1, max_size=16), st.integers(0, 255))
def test_corrupted_valid_message_only_raises_framing_error(index, junk, kind):
    frames = good_frames()
    frames[0] = struct.pack("!2sBBQ", MAGIC, 1, kind, 5) if index == 0 else frames[0]
    target = min(index, len(frames) - 1)
    frames[target] = frames[target][: len(frames[target]) // 2] + junk
    try:
        msg = decode(frames)
    except FramingError:
        return
    assert isinstance(msg, Message)


@pytest.mark.parametrize("shape, dtype", [((3, 5), "f4"), ((0,), "f8"), ((), "i8"), ((1000,), "u1")])
def test_aligned_empty(shape, dtype):
    array = aligned_empty(shape, dtype)
    assert array.size == 0 or array.ctypes.data % 64 == 0  # an empty array has no data to align
    assert array.shape == shape and array.dtype == np.dtype(dtype) and array.flags.writeable
