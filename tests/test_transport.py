"""Framed messages over real sockets on every transport: zero copy, malformed input, bounded queues."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from zpipe.errors import FramingError
from zpipe.framing import Kind, Message
from zpipe.transport import bound_endpoint, ipc_endpoint, make_socket, recv_message, send_message


def pair(ctx, endpoint, hwm=16):
    pull = make_socket(ctx, zmq.PULL, hwm=hwm)
    pull.bind(endpoint)
    push = make_socket(ctx, zmq.PUSH, hwm=hwm)
    push.connect(bound_endpoint(pull))
    return push, pull


def test_roundtrip_on_every_transport(ctx, endpoint):
    push, pull = pair(ctx, endpoint)
    try:
        big = np.arange(1 << 18, dtype=np.float32).reshape(512, 512)  # 1 MiB: above zmq's copy threshold
        small = np.array([[1, 2], [3, 4]], dtype=">i2")
        send_message(push, Message(kind=Kind.REQUEST, request_id=42, tensors={"big": big, "small": small},
                                   meta={"x": 1}))
        assert pull.poll(5000), "nothing arrived within 5 s"
        _, msg = recv_message(pull)
        assert msg.request_id == 42 and msg.meta == {"x": 1}
        np.testing.assert_array_equal(msg.tensors["big"], big)
        np.testing.assert_array_equal(msg.tensors["small"], small)
        assert msg.tensors["small"].dtype.str == ">i2"
        assert not msg.tensors["big"].flags.writeable
        if endpoint.startswith("inproc"):
            # On inproc the receiver's array is the sender's memory: proof that nothing was copied.
            assert np.shares_memory(msg.tensors["big"], big)
    finally:
        push.close()
        pull.close()


def test_received_tensor_is_a_view_of_the_zmq_frame(ctx, tmp_path):
    push, pull = pair(ctx, f"ipc://{tmp_path}/s")
    try:
        send_message(push, Message(kind=Kind.REQUEST, request_id=1, tensors={"a": np.ones(1 << 17)}))
        assert pull.poll(5000)
        frames = pull.recv_multipart(copy=False)
        from zpipe.framing import decode

        array = decode(frames).tensors["a"]
        frame_view = np.frombuffer(frames[2].buffer, dtype=np.uint8)
        assert np.shares_memory(array, frame_view)
    finally:
        push.close()
        pull.close()


def test_malformed_message_raises_and_socket_keeps_working(ctx, endpoint):
    push, pull = pair(ctx, endpoint)
    try:
        push.send_multipart([b"garbage", b"more"])
        send_message(push, Message(kind=Kind.REQUEST, request_id=2, tensors={"a": np.zeros(3)}))
        assert pull.poll(5000)
        with pytest.raises(FramingError, match="prefix frame"):
            recv_message(pull)
        assert pull.poll(5000)
        _, msg = recv_message(pull)  # the next, good message is intact
        assert msg.request_id == 2
    finally:
        push.close()
        pull.close()


def test_hwm_bounds_the_queue_and_blocks_the_producer(ctx, tmp_path):
    """A consumer that does not read makes the producer block (zmq.Again with NOBLOCK), not grow memory."""
    push, pull = pair(ctx, f"ipc://{tmp_path}/q", hwm=4)
    try:
        payload = np.zeros(1 << 20, dtype=np.uint8)  # 1 MiB messages, so kernel buffers hold at most a few
        sent = 0
        with pytest.raises(zmq.Again):
            for _ in range(200):
                send_message(push, Message(kind=Kind.REQUEST, request_id=sent, tensors={"p": payload}),
                             flags=zmq.NOBLOCK)
                sent += 1
        assert 4 <= sent <= 24, f"{sent} messages were accepted before the producer blocked"
        received = 0
        while pull.poll(1000):
            recv_message(pull)
            received += 1
        assert received == sent  # nothing accepted was lost
    finally:
        push.close()
        pull.close()


def test_ipc_endpoint_rejects_long_paths(tmp_path):
    with pytest.raises(ValueError, match="too long"):
        ipc_endpoint("/tmp/" + "x" * 120, "sink")
