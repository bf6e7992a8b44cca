"""The zpipe wire format: a :class:`Message` <-> a list of ZeroMQ frames. Pure: numpy and stdlib, no sockets.

A message is one ZeroMQ multipart message::

    frame 0   prefix   12 bytes, network order: b"ZP", protocol version (u8), kind (u8), request id (u64 < 2**63)
    frame 1   header   UTF-8 JSON object: {"t": [[name, dtype.str, shape], ...], "m": {meta}}
    frame 2+  tensors  one raw C-order byte frame per entry of "t", in order

The request id sits in the fixed-size prefix, so a router can match replies without parsing JSON. The header is
JSON, never pickle: decoding runs no code chosen by the sender. ``dtype.str`` makes byte order
explicit (``"<f4"``, ``">i8"``, ``"|u1"``). Every field is checked against :class:`Limits` before it is used, and any
violation raises :class:`~zpipe.errors.FramingError` naming the field, what was expected and what arrived.

Ownership
---------
* :func:`encode` does not copy C-contiguous arrays: the frames it returns are views of the caller's arrays, meant to
  be sent with ``copy=False``. The caller must not modify those arrays until the send is complete (on ``inproc``,
  until the receiver is done with them). Non-contiguous arrays are copied once, on purpose, into C order.
* :func:`decode` does not copy either: each tensor is a read-only ``np.frombuffer`` view of its frame, valid as
  long as the array is referenced. Whoever needs to write (or needs 64-byte alignment, as TVM does) copies into a
  buffer of its own; :func:`aligned_empty` makes one.
"""

from __future__ import annotations

import enum
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import FramingError

__all__ = [
    "MAGIC",
    "PROTOCOL_VERSION",
    "Kind",
    "Limits",
    "DEFAULT_LIMITS",
    "Message",
    "encode",
    "decode",
    "decode_head",
    "Head",
    "check_tensor",
    "check_message",
    "aligned_empty",
]

MAGIC = b"ZP"
PROTOCOL_VERSION = 1
_PREFIX = struct.Struct("!2sBBQ")
_JSON = json.JSONEncoder(separators=(",", ":"))  # json.dumps with options builds a new encoder on every call
_CACHE_SIZE = 256  # validated headers remembered by their bytes: a stream repeats the same shapes and meta
_CACHED_HEADER_MAX = 1024  # bigger headers (long meta) are parsed every time

# Byte order, kind, item size. Object, string, void, datetime and structured dtypes are never allowed on the wire.
_WIRE_DTYPES = frozenset(np.dtype(f"{order}{code}").str for order in "<>" for code in
                         ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"))
_META_SCALARS = (str, int, float, bool, type(None))
_META_EXACT = frozenset(_META_SCALARS)


class Kind(enum.IntEnum):
    """What a message is for."""

    REQUEST = 1  # tensors travelling towards the next stage
    REPLY = 2  # final outputs of a request
    ERROR = 3  # a request failed; meta holds "stage", "error" and "message"
    HEARTBEAT = 4  # liveness; no tensors
    CONTROL = 5  # READY / STOP / status; meta holds "op"


_KINDS = {int(k): k for k in Kind}


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Bounds every decoded field is checked against (and every encoded one, so we never send what a peer refuses)."""

    max_header_bytes: int = 64 * 1024
    max_tensors: int = 256
    max_ndim: int = 32
    max_name_chars: int = 256
    max_tensor_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_tensors", "max_ndim", "max_name_chars", "max_tensor_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be >= 1, got {getattr(self, name)!r}")


DEFAULT_LIMITS = Limits()


@dataclass(slots=True)
class Message:
    """One request's worth of named tensors plus small JSON metadata.

    ``request_id`` is an unsigned 63-bit integer chosen by whoever started the request; it is carried unchanged
    through every stage, so replies and errors can be matched to it.
    """

    kind: Kind
    request_id: int
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def check_tensor(name: str, array: Any, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Return ``array`` as a C-contiguous ndarray of an allowed dtype, or raise :class:`FramingError`.

    A non-contiguous array is copied into C order (the only copy :func:`encode` ever makes).
    """
    if not isinstance(name, str) or not name or len(name) > limits.max_name_chars:
        raise FramingError(f"tensor name must be a non-empty str of at most {limits.max_name_chars} chars, "
                           f"got {name!r}")
    if isinstance(array, np.generic):
        array = np.asarray(array)
    if not isinstance(array, np.ndarray):
        raise FramingError(f"tensor {name!r}: expected a numpy array, got {type(array).__name__}")
    if array.dtype.str not in _WIRE_DTYPES:
        raise FramingError(f"tensor {name!r}: dtype {array.dtype!s} ({array.dtype.str!r}) cannot travel; "
                           "allowed are bool, int, uint, float and complex")
    if array.ndim > limits.max_ndim:
        raise FramingError(f"tensor {name!r}: {array.ndim} dimensions, limit is {limits.max_ndim}")
    if array.nbytes > limits.max_tensor_bytes:
        raise FramingError(f"tensor {name!r}: {array.nbytes} bytes, limit is {limits.max_tensor_bytes}")
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return array


def check_message(message: Message, limits: Limits = DEFAULT_LIMITS) -> dict[str, np.ndarray]:
    """Check ``message`` as :func:`encode` does, without building frames (for a hand-off inside one process).

    Returns its tensors as :func:`check_tensor` leaves them.
    """
    if type(message.kind) is not Kind:
        Kind(message.kind)  # ValueError for a kind that does not exist
    rid = message.request_id
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < 2**63:
        raise FramingError(f"request id must be an int in [0, 2**63), got {rid!r}")
    if len(message.tensors) > limits.max_tensors:
        raise FramingError(f"{len(message.tensors)} tensors in one message, limit is {limits.max_tensors}")
    _check_meta(message.meta)
    return {name: check_tensor(name, array, limits) for name, array in message.tensors.items()}


def encode(message: Message, limits: Limits = DEFAULT_LIMITS) -> list[bytes | memoryview]:
    """Turn ``message`` into frames for ``send_multipart(frames, copy=False)``. Tensor frames are views, not copies."""
    kind = message.kind if type(message.kind) is Kind else Kind(message.kind)
    rid = message.request_id
    specs = []
    frames: list[bytes | memoryview] = []
    for name, array in check_message(message, limits).items():
        specs.append((name, array.dtype.str, array.shape))
        frames.append(memoryview(array.reshape(-1).view(np.uint8)) if array.size else b"")
    header = _encode_header(tuple(specs), message.meta, limits)
    return [_PREFIX.pack(MAGIC, PROTOCOL_VERSION, kind, rid), header, *frames]


_encoded_specs: dict[tuple, bytes] = {}  # specs -> their JSON text: most messages repeat the same shapes


def _encode_header(specs: tuple, meta: Mapping[str, Any], limits: Limits) -> bytes:
    encoded = _encoded_specs.get(specs)
    if encoded is None:
        encoded = _JSON.encode([[n, d, list(s)] for n, d, s in specs]).encode()
        if len(_encoded_specs) >= _CACHE_SIZE:
            _encoded_specs.clear()
        _encoded_specs[specs] = encoded
    header = b'{"t":%s,"m":%s}' % (encoded, _JSON.encode(meta).encode())
    if len(header) > limits.max_header_bytes:
        raise FramingError(f"header is {len(header)} bytes, limit is {limits.max_header_bytes}; "
                           "too many tensors or too much metadata")
    return header


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Turn received frames (``bytes``, ``memoryview`` or ``zmq.Frame``) into a :class:`Message` without copying.

    Raises :class:`FramingError` for anything that breaks the format or ``limits``; nothing else escapes.
    """
    if len(frames) < 2:
        raise FramingError(f"a message needs at least 2 frames (prefix, header), got {len(frames)}")
    head = decode_head(frames[0], frames[1], limits)
    if len(frames) - 2 != len(head.specs):
        raise FramingError(f"request {head.request_id}: header lists {len(head.specs)} tensors but "
                           f"{len(frames) - 2} tensor frames arrived")
    return head.message([head.tensor(i, frame) for i, frame in enumerate(frames[2:])])


@dataclass(frozen=True, slots=True)
class Head:
    """The validated prefix and header of a message: enough to know how many tensor frames follow and their sizes.

    Receivers that read frame by frame use it to choose, per tensor, between a copy (small frames: cheaper than a
    zero-copy frame object) and a zero-copy view (large frames).
    """

    kind: Kind
    request_id: int
    specs: tuple[tuple[str, np.dtype, tuple[int, ...], int], ...]  # name, dtype, shape, nbytes
    meta: dict[str, Any]

    def nbytes(self, index: int) -> int:
        return self.specs[index][3]

    def tensor(self, index: int, frame: Any) -> np.ndarray:
        """The read-only array for tensor ``index`` as a view of ``frame``; checks the frame's size."""
        name, dtype, shape, expected = self.specs[index]
        buf = frame if isinstance(frame, bytes) else _buffer(frame)
        size = len(buf) if isinstance(buf, bytes) else buf.nbytes
        if size != expected:
            raise FramingError(f"request {self.request_id}: tensor {name!r} {dtype.str}{shape} needs "
                               f"{expected} bytes, frame has {size}")
        try:
            array = np.frombuffer(buf, dtype=dtype)
            if len(shape) != 1:
                array = array.reshape(shape)
        except ValueError as exc:  # e.g. a zero-size tensor whose dims overflow numpy's index type
            raise FramingError(f"request {self.request_id}: tensor {name!r} shape {shape} is unusable: {exc}") from exc
        if array.flags.writeable:
            array.flags.writeable = False
        return array

    def message(self, arrays: Sequence[np.ndarray]) -> Message:
        return Message(kind=self.kind, request_id=self.request_id, meta=self.meta,
                       tensors={spec[0]: array for spec, array in zip(self.specs, arrays)})


def decode_head(prefix: Any, header: Any, limits: Limits = DEFAULT_LIMITS) -> Head:
    """Validate frame 0 and frame 1 of a message; raises :class:`FramingError`."""
    kind, rid = _decode_prefix(prefix if isinstance(prefix, bytes) else _buffer(prefix))
    specs, meta = _decode_header(header if isinstance(header, bytes) else bytes(_buffer(header)), rid, limits)
    return Head(kind=kind, request_id=rid, specs=specs, meta=meta)


def aligned_empty(shape: Sequence[int], dtype: Any, align: int = 64) -> np.ndarray:
    """A new writable C-contiguous array whose data starts on an ``align``-byte boundary (TVM/DLPack needs 64)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    offset = -raw.ctypes.data % align
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _buffer(frame: Any) -> memoryview:
    obj = getattr(frame, "buffer", frame)  # zmq.Frame exposes its memory as .buffer
    try:
        view = memoryview(obj)
        if not view.c_contiguous:
            raise BufferError("not C-contiguous")
        return view.cast("B") if view.format != "B" or view.ndim != 1 else view
    except (TypeError, ValueError, BufferError) as exc:
        raise FramingError(f"a frame must be a contiguous bytes-like object, got {type(frame).__name__}") from exc


def _decode_prefix(buf: bytes | memoryview) -> tuple[Kind, int]:
    if len(buf) != _PREFIX.size:
        raise FramingError(f"prefix frame must be {_PREFIX.size} bytes, got {len(buf)}")
    magic, version, kind, rid = _PREFIX.unpack(buf)
    if magic != MAGIC:
        raise FramingError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}: not a zpipe peer")
    if version != PROTOCOL_VERSION:
        raise FramingError(f"protocol version {version}, this zpipe speaks {PROTOCOL_VERSION}: upgrade the older side")
    if rid >= 2**63:
        raise FramingError(f"request id {rid} is out of range [0, 2**63)")
    found = _KINDS.get(kind)
    if found is None:
        raise FramingError(f"unknown message kind {kind}, expected one of {sorted(_KINDS)}")
    return found, rid


_decoded_headers: dict[bytes, tuple] = {}  # header bytes -> validated (specs, meta)


def _decode_header(raw: bytes, rid: int, limits: Limits) -> tuple[tuple, dict]:
    if len(raw) > limits.max_header_bytes:
        raise FramingError(f"request {rid}: header is {len(raw)} bytes, limit is {limits.max_header_bytes}")
    cached = _decoded_headers.get(raw) if limits is DEFAULT_LIMITS else None
    if cached is not None:
        specs, meta = cached
        return specs, dict(meta)  # the receiver owns its meta and may change it
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FramingError(f"request {rid}: header is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict) or set(header) != {"t", "m"}:
        raise FramingError(f"request {rid}: header must be an object with keys 't' and 'm', got "
                           f"{sorted(header) if isinstance(header, dict) else type(header).__name__}")
    meta = header["m"]
    if not isinstance(meta, dict):
        raise FramingError(f"request {rid}: meta must be an object, got {type(meta).__name__}")
    _check_meta(meta, rid)
    raw_specs = header["t"]
    if not isinstance(raw_specs, list) or len(raw_specs) > limits.max_tensors:
        raise FramingError(f"request {rid}: 't' must be a list of at most {limits.max_tensors} tensor specs")
    specs = []
    seen = set()
    for spec in raw_specs:
        specs.append(_decode_spec(spec, rid, limits))
        if specs[-1][0] in seen:
            raise FramingError(f"request {rid}: tensor {specs[-1][0]!r} appears twice")
        seen.add(specs[-1][0])
    specs = tuple(specs)
    # Only meta of scalars is remembered: a hit hands out a shallow copy, which must not share a list.
    if limits is DEFAULT_LIMITS and len(raw) <= _CACHED_HEADER_MAX and list not in map(type, meta.values()):
        if len(_decoded_headers) >= _CACHE_SIZE:
            _decoded_headers.clear()
        _decoded_headers[raw] = specs, dict(meta)
    return specs, meta


def _decode_spec(spec: Any, rid: int, limits: Limits) -> tuple[str, np.dtype, tuple[int, ...], int]:
    if not (isinstance(spec, list) and len(spec) == 3):
        raise FramingError(f"request {rid}: a tensor spec must be [name, dtype, shape], got {spec!r:.80}")
    name, dtype_str, shape = spec
    if not isinstance(name, str) or not name or len(name) > limits.max_name_chars:
        raise FramingError(f"request {rid}: bad tensor name {name!r:.80}")
    if not isinstance(dtype_str, str) or dtype_str not in _WIRE_DTYPES:
        raise FramingError(f"request {rid}: tensor {name!r} has dtype {dtype_str!r:.40}, allowed are bool, int, "
                           "uint, float and complex as numpy spells them: '<f4', '>i8', '|u1'...")
    dtype = np.dtype(dtype_str)
    if not isinstance(shape, list) or len(shape) > limits.max_ndim or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= limits.max_tensor_bytes for d in shape):
        raise FramingError(f"request {rid}: tensor {name!r} shape must be a list of at most {limits.max_ndim} "
                           f"ints in [0, {limits.max_tensor_bytes}], got {shape!r:.80}")
    if math.prod(shape) * dtype.itemsize > limits.max_tensor_bytes:
        raise FramingError(f"request {rid}: tensor {name!r} of shape {shape} exceeds {limits.max_tensor_bytes} bytes")
    return name, dtype, tuple(shape), math.prod(shape) * dtype.itemsize


def _check_meta(meta: Mapping[str, Any], rid: int | None = None) -> None:
    if not isinstance(meta, Mapping):
        where = f"request {rid}: " if rid is not None else ""
        raise FramingError(f"{where}meta must be a mapping, got {type(meta).__name__}")
    for key, value in meta.items():
        if type(value) in _META_EXACT and type(key) is str:  # the common case, without the generic checks below
            continue
        where = f"request {rid}: " if rid is not None else ""
        if not isinstance(key, str):
            raise FramingError(f"{where}meta key {key!r} is not a str")
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, _META_SCALARS) for v in items):
            raise FramingError(f"{where}meta {key!r} must be a JSON scalar or a flat list of them, got {value!r:.80}")
