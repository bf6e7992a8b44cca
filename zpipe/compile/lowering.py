"""How zpipe lowers a Relax module to a library: TVM's default pipeline, plus one schedule for CPU targets.

TVM's CPU pipeline fuses chains of elementwise ops into one TIR function but schedules nothing, so each op of the
chain still writes its whole result to a buffer that the next op reads back: ``x * 2 + 1`` on 1 MiB writes and
reads a 1 MiB intermediate (the CUDA pipeline inlines such chains with ``dlight``; the CPU one has no such rule).
:func:`inline_injective` inlines them, for functions made only of injective blocks (elementwise, reshape,
transpose...) whose buffers are all the same size: one loop nest, no intermediate. Measured on this 2-core
machine: 1 MiB ``x * 2 + 1`` 45-55 µs → 25-30 µs. Left alone: a producer that a consumer broadcasts or pads
(inlined, it would be computed again for each element of the larger output), and functions with a reduction
(conv, matmul, pooling: inlining a padding into an unscheduled convolution moves a bounds check into its
innermost loop). Functions marked scheduled (``tirx.is_scheduled``: MetaSchedule's tuned ones) are never touched.
"""

from __future__ import annotations

from typing import Any

from ..tvm_runtime import import_tvm

__all__ = ["compile_relax", "inline_injective"]


def compile_relax(mod: Any, target: Any) -> Any:
    """``tvm.compile(mod, target)``, with injective chains inlined when ``target`` is a CPU (``llvm``)."""
    tvm = import_tvm()
    target = tvm.target.Target(target) if isinstance(target, str) else target
    if target.kind.name != "llvm":
        return tvm.compile(mod, target=target)
    return tvm.compile(mod, target=target, relax_pipeline=_cpu_pipeline(target))


def _cpu_pipeline(target: Any) -> Any:
    tvm = import_tvm()
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight

    rule = dlight.ScheduleRule.from_callable("InlineInjective")(inline_injective)

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            passes = (cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)
                      + [dlight.ApplyDefaultSchedule(rule)]
                      + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


def inline_injective(func: Any, target: Any, tunable: bool) -> Any:
    """A dlight rule: in a TIR function made only of injective blocks, inline every block into the last one.

    Returns the schedule, or None to leave ``func`` as it is.
    """
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline

    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = s_tir.Schedule(func)
    blocks = normalize_prim_func(sch)
    if blocks is None or len(blocks) < 2 or not all(block.is_injective() for block in blocks):
        return None
    # Every block writes a buffer as large: no producer is inlined into a consumer that broadcasts or tiles it,
    # which would recompute it for every element of the larger output (exp(x[1, n]) + t[m, n]: m times).
    sizes = {_elements(sch.get(block.block_rv).writes) for block in blocks}
    if len(sizes) != 1 or None in sizes:
        return None
    before = len(blocks)
    left = try_inline(sch, blocks)
    return sch if len(left) < before else None


def _elements(regions: Any) -> int | None:
    """How many elements the buffers a block writes hold (None: a shape that is not a constant)."""
    total = 0
    for region in regions:
        count = 1
        buffer = region.source  # (TVM 0.27: a TensorRegion, whose source is the buffer)
        for dim in buffer.shape:
            if not hasattr(dim, "value"):
                return None
            count *= int(dim.value)
        total += count
    return total
