"""zpipe's CPU lowering: chains of injective ops become one loop nest; reductions are left as TVM makes them."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import s_tir, tirx  # noqa: E402
from tvm.relax.backend.cpu_generic import get_default_pipeline  # noqa: E402
from tvm.relax.frontend import nn  # noqa: E402

from zpipe.compile import export_stage  # noqa: E402
from zpipe.compile.lowering import _cpu_pipeline  # noqa: E402

pytestmark = pytest.mark.tvm


class Chain(nn.Module):
    def forward(self, x):
        return nn.op.permute_dims(x * 2.0 + 1.0, [1, 0]) - 3.0


class Broadcast(nn.Module):
    def forward(self, x, table):
        return nn.op.exp(x) + table  # x: [1, 8] broadcast over table: [64, 8]


class Conv(nn.Module):
    def __init__(self):
        self.conv = nn.Conv2D(3, 4, kernel_size=3, padding=1, bias=True)

    def forward(self, x):
        return nn.op.relu(self.conv(x))


def _blocks(pipeline, mod):
    """{TIR function: names of its top-level blocks} after ``pipeline``."""
    lowered = pipeline(mod)
    found = {}
    for gv, func in lowered.functions.items():
        if isinstance(func, tirx.PrimFunc):
            sch = s_tir.Schedule(func)
            found[gv.name_hint] = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    return found


def test_an_injective_chain_is_one_loop_nest_with_no_intermediate_buffer():
    mod, _ = Chain().export_tvm({"forward": {"x": nn.spec.Tensor((4, 8), "float32")}})
    target = tvm.target.Target("llvm")
    assert list(_blocks(get_default_pipeline(target), mod).values()) == [
        ["T_multiply", "T_add", "T_transpose", "T_subtract"]]  # TVM's own: three intermediates
    assert list(_blocks(_cpu_pipeline(target), mod).values()) == [["T_subtract"]]


def test_a_producer_is_not_inlined_into_a_consumer_that_broadcasts_it():
    """Inlined, exp(x) would run once per element of the [64, 8] output instead of once per element of x."""
    mod, _ = Broadcast().export_tvm({"forward": {"x": nn.spec.Tensor((1, 8), "float32"),
                                                 "table": nn.spec.Tensor((64, 8), "float32")}})
    target = tvm.target.Target("llvm")
    assert _blocks(_cpu_pipeline(target), mod) == _blocks(get_default_pipeline(target), mod)
    assert [len(b) for b in _blocks(_cpu_pipeline(target), mod).values()] == [2]


def test_reductions_keep_their_blocks():
    mod, _ = Conv().export_tvm({"forward": {"x": nn.spec.Tensor((1, 3, 8, 8), "float32")}})
    target = tvm.target.Target("llvm")
    assert _blocks(_cpu_pipeline(target), mod) == _blocks(get_default_pipeline(target), mod)


def test_inlined_chain_computes_what_numpy_does(tmp_path):
    from stages.tvm import TvmStage

    mod, _ = Chain().export_tvm({"forward": {"x": nn.spec.Tensor((4, 8), "float32")}})
    export_stage(mod, name="chain", out_dir=tmp_path, function="forward", input_names=["x"], output_names=["y"])
    stage = TvmStage(library=str(tmp_path / "chain.so"))
    stage.setup()
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    y = stage.process({"x": x})["y"]
    np.testing.assert_allclose(y, (x * 2 + 1).T - 3, rtol=1e-6)
