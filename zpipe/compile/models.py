"""Small ONNX models built in code (no downloads): the demo CNN, its gated variant, and the builder behind them.

    demo_model():        x ─ stem ─┬─ a: 2× conv3x3+relu ─────────┐
                                   ├─ b: conv1x1+relu ────────────┼─ concat ─ head (conv1x1, max pool, gemm) ─ y
                                   └─ c: maxpool3x3, conv1x1+relu ┘
    gated_demo_model():  x ─ stem ─ If(offload) then: the three branches above and a conv1x1 (the heavy path)
                                                else: one conv1x1+relu (the light path)      ─ head ─ y

Weights are fixed random values from a seed. Every model passes ``onnx.checker`` and runs in onnxruntime.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["OnnxNet", "demo_model", "gated_demo_model", "inception_net", "DEMO_INPUT_SHAPE"]

DEMO_INPUT_SHAPE = (1, 3, 32, 32)


class OnnxNet:
    """Collects nodes and initializers of a model (or of an ``If`` body) built with ``onnx.helper``.

    Weights are drawn from ``seed`` (scaled by 1/sqrt(fan-in)); tensor names are exactly the ones given, so they
    become the wire names of the stages cut from the model.
    """

    def __init__(self, *, seed: int = 0, opset: int = 17) -> None:
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    def weight(self, name: str, shape: Sequence[int], *, into: "OnnxNet | None" = None) -> str:
        from onnx import numpy_helper

        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
        value = (self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        (into or self).initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], output: str, *, into: "OnnxNet | None" = None,
           attrs: dict | None = None) -> str:
        from onnx import helper

        (into or self).nodes.append(helper.make_node(op_type, list(inputs), [output], name=output,
                                                     **(attrs or {})))
        return output

    def conv(self, x: str, cin: int, cout: int, k: int, out: str, *, relu: bool = True,
             weights_in: "OnnxNet | None" = None, into: "OnnxNet | None" = None) -> str:
        """conv k×k (same padding) + bias (+ relu); weights go to ``weights_in`` (default: this net)."""
        w = self.weight(f"{out}.w", (cout, cin, k, k), into=weights_in)
        b = self.weight(f"{out}.b", (cout,), into=weights_in)
        pad = k // 2
        conv = self.op("Conv", [x, w, b], f"{out}.conv" if relu else out, into=into,
                       attrs={"pads": [pad] * 4, "kernel_shape": [k, k]})
        return self.op("Relu", [conv], out, into=into) if relu else conv

    def graph(self, name: str, inputs: Sequence[Any], outputs: Sequence[Any]) -> Any:
        from onnx import helper

        return helper.make_graph(self.nodes, name, list(inputs), list(outputs), self.initializers)

    def model(self, name: str, inputs: Sequence[Any], outputs: Sequence[Any]) -> Any:
        """The checked ModelProto of this net's graph."""
        import onnx
        from onnx import helper

        model = helper.make_model(self.graph(name, inputs, outputs),
                                  opset_imports=[helper.make_opsetid("", self.opset)], producer_name="zpipe")
        onnx.checker.check_model(model, full_check=True)
        return model


def _tensor(name: str, shape: Sequence[int] | None, elem: int | None = None) -> Any:
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT if elem is None else elem, shape)


def _inception(net: OnnxNet, h: str, out: str, *, into: OnnxNet | None = None,
               weights_in: OnnxNet | None = None, width: int = 8, depth: int = 2) -> str:
    a = h
    for layer in range(1, depth):
        a = net.conv(a, width, width, 3, f"a{layer}", into=into, weights_in=weights_in)
    a = net.conv(a, width, width, 3, "a", into=into, weights_in=weights_in)
    b = net.conv(h, width, width, 1, "b", into=into, weights_in=weights_in)
    pool = net.op("MaxPool", [h], "c.pool", into=into, attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]})
    c = net.conv(pool, width, width, 1, "c", into=into, weights_in=weights_in)
    return net.op("Concat", [a, b, c], out, into=into, attrs={"axis": 1})


def _head(net: OnnxNet, m: str, channels: int) -> str:
    z = net.conv(m, channels, 16, 1, "z")
    g = net.op("GlobalMaxPool", [z], "g")
    f = net.op("Flatten", [g], "f")
    return net.op("Gemm", [f, net.weight("fc.w", (10, 16)), net.weight("fc.b", (10,))], "y",
                  attrs={"transB": 1})


def demo_model(*, seed: int = 0, width: int = 8, size: int = 32, depth: int = 2) -> Any:
    """The demo CNN: a stem, three parallel branches (the fork is ``h``, the join ``m``), and a head.

    ``width`` channels, ``size``×``size`` input, ``depth`` conv3x3 layers in branch a: the defaults make the light
    demo; larger values make a model worth offloading (bench/offload.py ``--heavy``).
    """
    net = OnnxNet(seed=seed)
    h = net.conv("x", 3, width, 3, "h")
    m = _inception(net, h, "m", width=width, depth=depth)
    _head(net, m, 3 * width)
    return net.model("demo", [_tensor("x", (1, 3, size, size))], [_tensor("y", (1, 10))])


def gated_demo_model(*, seed: int = 0) -> Any:
    """The demo CNN with an ``If`` on the boolean input ``offload``: then = the heavy three-branch block (weights in
    the outer graph, read from inside the body), else = one light conv1x1 (weights inside the body)."""
    from onnx import TensorProto, helper

    net = OnnxNet(seed=seed)
    h = net.conv("x", 3, 8, 3, "h")
    heavy, light = OnnxNet(seed=seed + 1), OnnxNet(seed=seed + 2)
    m = _inception(net, h, "m", into=heavy)
    net.conv(m, 24, 16, 1, "heavy", into=heavy)
    light.conv(h, 8, 16, 1, "light")
    shape = (1, 16, 32, 32)
    net.op("If", ["offload"], "u", attrs={
        "then_branch": heavy.graph("heavy_path", [], [_tensor("heavy", shape)]),
        "else_branch": light.graph("light_path", [], [_tensor("light", shape)])})
    _head(net, "u", 16)
    return net.model("gated_demo", [_tensor("x", DEMO_INPUT_SHAPE), helper.make_tensor_value_info(
        "offload", TensorProto.BOOL, [])], [_tensor("y", (1, 10))])


def inception_net(*, blocks: int = 9, branches: int = 4, channels: int = 8, size: int = 16, seed: int = 0) -> Any:
    """An Inception-style net cut by ``zpipe compile`` into ``blocks * (branches + 1) + 1`` stages: a stem, then per
    block ``branches`` parallel conv branches joined by a concat and a conv1x1 projection, then a head.

    Branch ``i`` of a block is ``i + 1`` chained conv1x1 layers (a mix of light and heavier branches). Sized to
    exercise many-stage pipelines (stage groups, start-up), not accuracy.
    """
    net = OnnxNet(seed=seed)
    h = net.conv("x", 3, channels, 3, "stem")
    for block in range(1, blocks + 1):
        outs = []
        for branch in range(branches):
            t = h
            for layer in range(branch + 1):
                t = net.conv(t, channels, channels, 1, f"b{block}.{branch}.{layer}")
            outs.append(t)
        cat = net.op("Concat", outs, f"b{block}.cat", attrs={"axis": 1})
        h = net.conv(cat, channels * branches, channels, 1, f"b{block}")
    _head(net, h, channels)
    return net.model(f"inception_{blocks}x{branches}", [_tensor("x", (1, 3, size, size))], [_tensor("y", (1, 10))])
