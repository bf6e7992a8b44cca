"""The only module that creates ZeroMQ sockets: socket options, endpoints, and framed send/receive.

Every socket gets ``linger=0`` (closing never hangs on unsent data: zpipe accounts for requests itself) and
explicit high-water marks (bounded queues: PUSH and DEALER block at the mark, so a slow consumer back-pressures its
producers instead of growing memory). Messages go through :mod:`zpipe.framing` and are sent with ``copy=False``.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq

from .errors import FramingError
from .framing import DEFAULT_LIMITS, Limits, Message, decode_head, encode

__all__ = ["new_context", "make_socket", "ipc_endpoint", "send_message", "recv_message", "bound_endpoint", "Waker",
           "curve_server", "curve_client", "read_public_key", "is_loopback"]


def new_context() -> zmq.Context:
    """A fresh context for this process (never inherit one across fork/spawn)."""
    return zmq.Context()


# pyzmq sends a frame of at least this many bytes without copying it (copy=False); smaller ones are copied. Zero copy
# costs a hand-off to pyzmq's garbage-collector thread when libzmq is done with the frame, which costs more than
# copying up to ~256 KiB here: with 8 requests in flight, 64 KiB replies went from 4,468 to 6,113 req/s and 128 KiB
# from 4,393 to 5,577; 256 KiB was even, and 512 KiB and 1 MiB are faster zero-copy (pyzmq's default is 64 KiB).
ZERO_COPY_SEND_MIN = 256 << 10


def make_socket(ctx: zmq.Context, kind: int, *, hwm: int, identity: bytes | None = None,
                max_message_bytes: int | None = None) -> zmq.Socket:
    """A socket with zpipe's options. Options that libzmq reads only at bind/connect are set here, before either."""
    sock = ctx.socket(kind)
    sock.copy_threshold = ZERO_COPY_SEND_MIN
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    # Peers start in any order; libzmq's default 100 ms retry would delay a pipeline's first requests.
    sock.setsockopt(zmq.RECONNECT_IVL, 10)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if max_message_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown peer is an error, not a silent drop
    return sock


def ipc_endpoint(rundir: str | Path, name: str) -> str:
    """``ipc://`` endpoint for ``name`` inside ``rundir``; raises ValueError when the path is too long for a socket."""
    path = os.path.join(str(rundir), name)
    if len(path.encode()) > 100:  # sun_path holds 108 bytes, including the terminator
        raise ValueError(f"ipc path {path!r} is too long for a unix socket; use a shorter run directory")
    return f"ipc://{path}"


def bound_endpoint(sock: zmq.Socket) -> str:
    """The endpoint a socket actually bound to (resolves ``tcp://127.0.0.1:*`` to the real port)."""
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


class Waker:
    """A file descriptor an I/O loop polls next to its sockets, so other threads can wake it (a self-pipe).

    Threads that must not touch the loop's sockets hand work over a queue and call :meth:`wake`; the loop polls
    :attr:`fd` and calls :meth:`clear` when it is readable.
    """

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)  # wake() is called from signal handlers too: it must never block

    def wake(self) -> None:
        try:
            os.write(self._w, b"w")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake already

    def clear(self) -> None:
        try:
            os.read(self.fd, 65536)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._w)


_SNDMORE = int(zmq.SNDMORE)


def send_message(sock: zmq.Socket, message: Message, *, envelope: list[bytes] | None = None, flags: int = 0,
                 limits: Limits = DEFAULT_LIMITS) -> None:
    """Encode and send ``message`` without copying its tensors. ``envelope`` prefixes ROUTER identity frames.

    The arrays in ``message`` must not be modified until the message has left (see :mod:`zpipe.framing`).
    """
    frames = encode(message, limits)
    if envelope:
        frames = envelope + frames
    flags = int(flags)  # plain ints: zmq's flag enums cost ~1 µs per | on this path
    more = flags | _SNDMORE
    for frame in frames[:-1]:
        sock.send(frame, more, copy=False)
    sock.send(frames[-1], flags, copy=False)


def recv_message(sock: zmq.Socket, *, envelope_frames: int = 0, flags: int = 0,
                 limits: Limits = DEFAULT_LIMITS) -> tuple[list[bytes], Message]:
    """Receive one message; returns the envelope (ROUTER identity frames) and the decoded :class:`Message`.

    Frames are read one by one: the header is validated first, then each tensor frame is received as a copy when
    it is small (cheaper than a frame object) or as a zero-copy ``zmq.Frame`` when it reaches zmq's copy threshold;
    either way the tensor is a read-only view. Raises :class:`~zpipe.errors.FramingError` for a malformed message
    only after consuming all of its frames, so the socket stays in step.
    """
    first = sock.recv(flags=flags)  # zmq.Again escapes here, before anything is consumed
    parts = [first]
    try:
        while len(parts) < envelope_frames + 2:
            if not sock.getsockopt(zmq.RCVMORE):
                raise FramingError(f"a message needs {envelope_frames + 2} frames before its tensors, "
                                   f"got {len(parts)}")
            parts.append(sock.recv())
        envelope = parts[:envelope_frames]
        head = decode_head(parts[envelope_frames], parts[envelope_frames + 1], limits)
        arrays = []
        for index in range(len(head.specs)):
            if not sock.getsockopt(zmq.RCVMORE):
                raise FramingError(f"request {head.request_id}: header lists {len(head.specs)} tensors but "
                                   f"{index} tensor frames arrived")
            frame = sock.recv(copy=head.nbytes(index) < zmq.COPY_THRESHOLD)
            arrays.append(head.tensor(index, frame))
        if sock.getsockopt(zmq.RCVMORE):
            raise FramingError(f"request {head.request_id}: more frames than the {len(head.specs)} tensors "
                               "its header lists")
    except Exception as exc:
        while sock.getsockopt(zmq.RCVMORE):  # drop the rest of the bad message, keeping the socket in step
            sock.recv(copy=False)
        exc.envelope = parts[:envelope_frames]  # so a ROUTER can still answer the sender
        raise
    return envelope, head.message(arrays)


# -- CurveZMQ --------------------------------------------------------------------------------------------------------
# Keys are files written by `zpipe keygen NAME` (pyzmq's certificate format): NAME.key holds the public key,
# NAME.key_secret both. A server needs its secret file and a folder of allowed clients' public files; a client
# needs the server's public key and its own secret file.

def read_public_key(path_or_key: str | Path) -> bytes:
    """A Z85 public key, from a key file (``.key`` or ``.key_secret``) or given inline (40 chars)."""
    import zmq.auth

    text = str(path_or_key)
    if len(text) == 40 and not os.path.exists(text):
        return text.encode()
    try:
        public, _ = zmq.auth.load_certificate(text)
    except (OSError, ValueError) as exc:
        raise FramingError(f"cannot read a Curve public key from {text!r}: {exc}") from exc
    return public


def _read_secret(path: str | Path) -> tuple[bytes, bytes]:
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise FramingError(f"cannot read a Curve key pair from {str(path)!r}: {exc}") from exc
    if secret is None:
        raise FramingError(f"{str(path)!r} holds only a public key; give the .key_secret file")
    return public, secret


def curve_server(sock: zmq.Socket, secret_file: str | Path) -> None:
    """Make ``sock`` a Curve server with the key pair in ``secret_file`` (call before bind)."""
    public, secret = _read_secret(secret_file)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True


def curve_client(sock: zmq.Socket, server_public: str | Path, secret_file: str | Path) -> None:
    """Make ``sock`` a Curve client of the server whose public key is given (call before connect)."""
    public, secret = _read_secret(secret_file)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = read_public_key(server_public)


def is_loopback(endpoint: str) -> bool:
    """True for endpoints that cannot leave this host: inproc, ipc, tcp on 127.x / ::1 / localhost."""
    if endpoint.startswith(("inproc://", "ipc://")):
        return True
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host in ("localhost", "::1")