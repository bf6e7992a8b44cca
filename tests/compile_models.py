"""Tiny ONNX models for the compile tests, built in code with zpipe.compile.models.OnnxNet (no downloads).

    chain:      x ─ conv3x3 ─ h1 ─ conv3x3 ─ h2 ─ avgpool ─ p ─ flatten, gemm ─ y
    two_branch: x ─ stem ─ h ─┬─ conv3x3, conv3x3 ─ a ─┐
                              └─ conv1x1 ──────────── b ┴─ concat ─ head ─ y
    inception:  x ─ stem ─ h ─ residual block (conv, conv, + h) ─ r ─┬─ conv1x1 ─────────── a ─┐
                                                                     ├─ conv1x1, conv3x3 ── b ─┼─ concat ─ conv1x1 ─ + r ─ head ─ y
                                                                     └─ maxpool, conv1x1 ── c ─┘
    gated:      zpipe.compile.models.gated_demo_model (If on the input "offload")
    computed:   x ─ stem ─ h; X = mean(x) > 0 ─ If(X) then conv3x3 / else conv1x1 ─ u ─ head ─ y
    torch_style: names as torch.onnx.export writes them ("input.1", "/stem/Relu_output_0"), two branches joined
                by Add, and a flatten done with Shape/Gather/Unsqueeze/Concat/Reshape arithmetic
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from zpipe.compile.models import OnnxNet, gated_demo_model

SHAPE = (1, 3, 16, 16)


def _io(shape=SHAPE, outputs=(("y", (1, 4)),)):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)]
    return inputs, [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs]


def _head(net: OnnxNet, m: str, channels: int) -> str:
    p = net.op("GlobalAveragePool", [m], "p")
    f = net.op("Flatten", [p], "f")
    return net.op("Gemm", [f, net.weight("fc.w", (4, channels)), net.weight("fc.b", (4,))], "y",
                  attrs={"transB": 1})


def chain(*, batch_dim: int | str = 1):
    net = OnnxNet(seed=1)
    h1 = net.conv("x", 3, 8, 3, "h1")
    h2 = net.conv(h1, 8, 8, 3, "h2")
    _head(net, h2, 8)
    return net.model("chain", *_io(shape=(batch_dim, *SHAPE[1:])))


def two_branch():
    net = OnnxNet(seed=2)
    h = net.conv("x", 3, 8, 3, "h")
    a = net.conv(net.conv(h, 8, 8, 3, "a1"), 8, 8, 3, "a")
    b = net.conv(h, 8, 8, 1, "b")
    m = net.op("Concat", [a, b], "m", attrs={"axis": 1})
    _head(net, net.conv(m, 16, 8, 1, "z"), 8)
    return net.model("two_branch", *_io())


def inception():
    net = OnnxNet(seed=3)
    h = net.conv("x", 3, 8, 3, "h")
    r2 = net.conv(net.conv(h, 8, 8, 3, "r1"), 8, 8, 3, "r2", relu=False)
    r = net.op("Relu", [net.op("Add", [h, r2], "r.sum")], "r")
    a = net.conv(r, 8, 8, 1, "a")
    b = net.conv(net.conv(r, 8, 4, 1, "b1"), 4, 8, 3, "b")
    c = net.conv(net.op("MaxPool", [r], "c.pool", attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
                 8, 8, 1, "c")
    cat = net.op("Concat", [a, b, c], "cat", attrs={"axis": 1})
    out = net.op("Add", [net.conv(cat, 24, 8, 1, "proj", relu=False), r], "out")
    _head(net, out, 8)
    return net.model("inception", *_io())


def gated():
    return gated_demo_model(seed=4)


def computed_condition():
    """The If's condition X is computed from the input: X = mean(x) > 0."""
    net = OnnxNet(seed=5)
    h = net.conv("x", 3, 8, 3, "h")
    mean = net.op("ReduceMean", ["x"], "x.mean", attrs={"keepdims": 0})
    net.op("Greater", [mean, net.op("Constant", [], "zero", attrs={"value": helper.make_tensor(
        "zero.value", TensorProto.FLOAT, [], [0.0])})], "X")
    then_, else_ = OnnxNet(seed=6), OnnxNet(seed=7)
    then_.conv(h, 8, 8, 3, "t")
    else_.conv(h, 8, 8, 1, "e")
    shape = (1, 8, 16, 16)
    net.op("If", ["X"], "u", attrs={
        "then_branch": then_.graph("then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, shape)]),
        "else_branch": else_.graph("else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, shape)])})
    _head(net, "u", 8)
    return net.model("computed", *_io())


def torch_style():
    net = OnnxNet(seed=9)
    stem = net.conv("input.1", 3, 8, 3, "/stem/Relu_output_0")
    a = net.conv(stem, 8, 8, 3, "/a/Relu_output_0")
    b = net.conv(stem, 8, 8, 1, "/b/Conv_output_0", relu=False)
    add = net.op("Add", [a, b], "/add/Add_output_0")
    pooled = net.op("GlobalAveragePool", [add], "/pool/GlobalAveragePool_output_0")
    shape = net.op("Shape", [pooled], "/flatten/Shape_output_0")
    zero = net.op("Constant", [], "/flatten/Constant_output_0",
                  attrs={"value": helper.make_tensor("zero", TensorProto.INT64, [], [0])})
    batch = net.op("Gather", [shape, zero], "/flatten/Gather_output_0", attrs={"axis": 0})
    axes = net.op("Constant", [], "/flatten/Constant_1_output_0",
                  attrs={"value": helper.make_tensor("axes", TensorProto.INT64, [1], [0])})
    batch1 = net.op("Unsqueeze", [batch, axes], "/flatten/Unsqueeze_output_0")
    minus1 = net.op("Constant", [], "/flatten/Constant_2_output_0",
                    attrs={"value": helper.make_tensor("m1", TensorProto.INT64, [1], [-1])})
    new_shape = net.op("Concat", [batch1, minus1], "/flatten/Concat_output_0", attrs={"axis": 0})
    flat = net.op("Reshape", [pooled, new_shape], "/flatten/Reshape_output_0")
    net.op("MatMul", [flat, net.weight("fc.weight", (8, 4))], "output")
    return net.model("torch_style", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, SHAPE)],
                     [helper.make_tensor_value_info("output", TensorProto.FLOAT, (1, 4))])


def unsupported_op():
    """A chain with a Celu node, which onnxruntime runs and TVM's ONNX frontend cannot import."""
    net = OnnxNet(seed=8)
    h = net.conv("x", 3, 8, 3, "h")
    c = net.op("Celu", [h], "celu")
    _head(net, c, 8)
    return net.model("unsupported", *_io())


def inputs(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
