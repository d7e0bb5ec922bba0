"""graphslim's Relax pipeline for CPU targets: layout, legalization, (tuned) schedules, lowering.

TVM's CPU pipeline (``relax.backend.cpu_generic``) legalizes and fuses but leaves every kernel
unscheduled. This one, for LLVM targets:

1. turns the importer's stack-and-reduce form of variadic Max/Min/Sum/Mean back into binary ops
   (:func:`unstack_reductions`) and bounds the gathers of run-time indices (:func:`bound_gathers`);
   converts convolutions, where the module has any, to NHWC activations with HWIO weights
   (:func:`convert_layout`: the transposes it adds at the edges fold into the constant weights or
   run once per model), moves transposes down through elementwise ops it does not convert (QDQ
   quantize/dequantize, activations, residual adds) and removes the pairs that then cancel;
   then applies graphslim's Relax rewrites (``graphslim.kernels.REWRITES``: the compression-aware
   kernels see NHWC convolutions with constant HWIO weights);
2. legalizes and fuses exactly as TVM does (so MetaSchedule task keys match TVM's own);
3. applies a MetaSchedule database when tuning (``tune`` trials, ``tuning_db`` folder);
4. schedules every kernel left with graphslim's default rules
   (:mod:`graphslim.kernels.schedules`); anything they do not cover keeps TVM's default;
5. optionally lifts the weights out of the library into parameters of ``main``
   (:mod:`graphslim.kernels.params`);
6. lowers as TVM does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "NHWC_LAYOUTS",
    "apply_schedule_rules",
    "bound_gathers",
    "cancel_transposes",
    "convert_layout",
    "cpu_pipeline",
    "has_op",
    "rewrite_calls",
    "static_shape",
    "sink_transposes",
    "unstack_reductions",
    "visit_relax_functions",
]

log = logging.getLogger(__name__)

#: ConvertLayout's desired layouts: data NHWC, kernel HWIO (output channel innermost).
NHWC_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "HWIO"]}


def cpu_pipeline(
    target: Any,
    *,
    tune: int = 0,
    tuning_db: str | Path | None = None,
    tuning_report: dict[str, Any] | None = None,
    rpc: tuple[str, str] | None = None,
    progress: bool = False,
    measure_threads: int | None = None,
    schedule_report: dict[str, Any] | None = None,
    rewrites: Mapping[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
    rewrites_applied: list[str] | None = None,
    lifted_params: list[Any] | None = None,
) -> Any:
    """A module pass compiling a Relax module (from the ONNX frontend) for an LLVM ``target``.
    ``schedule_report`` (a dict) receives which rule scheduled each kernel (see
    :func:`apply_schedule_rules`) and ``tuning_report`` what tuning did; tuning measures on
    ``measure_threads`` threads (local runs). With ``lifted_params`` (a list), the weights leave
    the library: ``main`` takes them after its inputs, and the list receives their values
    (:func:`graphslim.kernels.params.lift_constants`, once every rewrite and fold is done)."""
    import tvm
    from graphslim.kernels import import_stage
    from graphslim.kernels.schedules import default_cpu_rules
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="GraphslimCPUPipeline")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            # in the order ``rewrites`` gives (graphslim.kernels.REWRITES: the order of its
            # IMPORT_REWRITES and FOLDED_REWRITES), split by stage
            early = [(n, r) for n, r in (rewrites or {}).items() if import_stage(n)]
            late = [(n, r) for n, r in (rewrites or {}).items() if not import_stage(n)]
            mod = _apply_rewrites(bound_gathers(unstack_reductions(mod)), early, spec, rewrites_applied)
            mod = convert_layout(mod)
            mod = relax.transform.DeadCodeElimination()(cancel_transposes(sink_transposes(mod)))
            mod = relax.transform.FoldConstant()(mod)  # the weights' layout transforms
            mod = _apply_rewrites(mod, late, spec, rewrites_applied)
            mod = relax.transform.FastMathTransform()(mod)
            mod = tvm.transform.Sequential(cpu.library_dispatch_passes(target) + cpu.legalize_passes(target))(mod)
            if tune > 0 or tuning_db is not None:
                if tuning_db is None:
                    raise ValueError("tuning needs a database folder")
                from graphslim.kernels.tuning import tune as run_tuning

                database = run_tuning(
                    mod,
                    target,
                    tune,
                    tuning_db,
                    rpc=rpc,
                    progress=progress,
                    report=tuning_report,
                    threads=measure_threads,
                )
                with database:
                    mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            mod = apply_schedule_rules(mod, target, default_cpu_rules(), schedule_report)
            if lifted_params is not None:
                from graphslim.kernels.params import lift_constants

                mod, values = lift_constants(mod)
                lifted_params.extend(values)
            mod = tvm.transform.Sequential(cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))(mod)
        return mod

    return _pipeline


def has_op(mod: Any, name: str) -> bool:
    """Whether a Relax function of ``mod`` calls the operator ``name`` (e.g. ``relax.nn.conv2d``)."""
    import tvm
    from tvm import relax

    op = tvm.ir.Op.get(name)
    found = [False]

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and expr.op == op:
            found[0] = True

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function) and not found[0]:
            relax.analysis.post_order_visit(func, visit)
    return found[0]


def convert_layout(mod: Any) -> Any:
    """Convolutions to NHWC / HWIO (:data:`NHWC_LAYOUTS`), where the module has any: the conversion
    only pays for convolutions, and ``ConvertLayout`` fails on modules it has nothing to do with
    (a ``match_cast`` of a data-dependent shape: "Cannot convert when exactly one of the layouts is
    unknown"). Where it fails on a module with convolutions, they stay NCHW (correct, slower) and a
    warning says so."""
    import tvm
    from tvm import relax

    if not has_op(mod, "relax.nn.conv2d"):
        return mod
    try:
        return relax.transform.ConvertLayout(NHWC_LAYOUTS)(mod)
    except tvm.error.InternalError as e:  # a TVM check failed on some binding: keep NCHW
        log.warning(
            "layout conversion to NHWC failed, convolutions stay NCHW (slower): %s", str(e).strip().splitlines()[-1]
        )
        return mod


def _apply_rewrites(
    mod: Any, rewrites: Sequence[tuple[str, Any]], spec: dict[str, Any] | None, applied: list[str] | None
) -> Any:
    for name, rewrite in rewrites:
        mod, changed = rewrite(mod, spec or {})
        if changed and applied is not None:
            applied.append(name)
    return mod


def apply_schedule_rules(mod: Any, target: Any, rules: list[Any], report: dict[str, Any] | None = None) -> Any:
    """Schedule every PrimFunc not scheduled yet (e.g. by a tuning database) with the first rule
    that accepts it, like dlight's ``ApplyDefaultSchedule``, recording per kernel which rule did
    (``report["kernels"][name]``: a rule name, "database", "kernel:NAME" for graphslim's own
    hand-written kernels, or "unscheduled") and counts per rule."""
    from tvm import tirx

    kernels: dict[str, str] = {}
    updated = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        attrs = func.attrs if func.attrs is not None else {}
        if "graphslim.kernel" in attrs:
            kernels[gv.name_hint] = f"kernel:{attrs['graphslim.kernel']}"
            continue
        if "tirx.is_scheduled" in attrs and int(attrs["tirx.is_scheduled"]):
            kernels[gv.name_hint] = "database"
            continue
        kernels[gv.name_hint] = "unscheduled"
        for rule in rules:
            sch = rule.apply(func, target, False)
            if sch is None:
                continue
            sch = sch[0] if isinstance(sch, list) else sch
            updated[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            kernels[gv.name_hint] = type(rule).__name__
            break
    for gv, func in updated.items():
        mod[gv] = func
    if report is not None:
        counts: dict[str, int] = {}
        for how in kernels.values():
            counts[how] = counts.get(how, 0) + 1
        report.update(kernels=dict(sorted(kernels.items())), counts=dict(sorted(counts.items())))
    return mod


def cancel_transposes(mod: Any) -> Any:
    """``permute_dims(permute_dims(x, a), b)`` -> ``x`` where the two permutations cancel (the
    inner one is left for dead-code elimination when nothing else uses it)."""
    import tvm
    from tvm import relax

    permute = tvm.ir.Op.get("relax.permute_dims")

    def axes(call: Any, rank: int) -> list[int]:
        given = call.attrs.axes
        return [int(a) for a in given] if given is not None else list(range(rank))[::-1]

    @relax.expr_functor.mutator
    class Cancel(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if call.op != permute:
                return call
            arg = call.args[0]
            inner = self.lookup_binding(arg) if isinstance(arg, relax.Var) else arg
            if not isinstance(inner, relax.Call) or inner.op != permute:
                return call
            try:
                rank = len(inner.args[0].ty.shape)
            except (AttributeError, TypeError):
                return call
            a, b = axes(inner, rank), axes(call, rank)
            if [a[i] for i in b] == list(range(rank)):
                return inner.args[0]
            return call

    return visit_relax_functions(Cancel(mod), mod)


def unstack_reductions(mod: Any) -> Any:
    """``max(stack([broadcast_to(a), broadcast_to(b), ...]), axis=0)`` -> ``maximum(maximum(a, b), ...)``,
    likewise ``min`` / ``sum`` / ``mean`` (-> ``minimum`` / ``add`` / ``add`` then divide). TVM's ONNX
    importer turns variadic Max/Min/Sum/Mean into that stack-and-reduce form: a copy of every
    input, and a tensor one rank higher that ``ConvertLayout`` cannot map (a 4-D residual sum
    becomes 5-D: "Invalid SLayout: can't find S in source layout ABCDE"). Binary ops broadcast as
    the ONNX ops do, so the result is the same up to float summation order."""
    import tvm
    import tvm_ffi
    from tvm import relax

    stack, broadcast = tvm.ir.Op.get("relax.stack"), tvm.ir.Op.get("relax.broadcast_to")
    binary = {
        tvm.ir.Op.get("relax.max"): relax.op.maximum,
        tvm.ir.Op.get("relax.min"): relax.op.minimum,
        tvm.ir.Op.get("relax.sum"): relax.op.add,
        tvm.ir.Op.get("relax.mean"): relax.op.add,
    }
    mean = tvm.ir.Op.get("relax.mean")

    @relax.expr_functor.mutator
    class Unstack(relax.PyExprMutator):
        def bound(self, expr: Any) -> Any:
            return self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if call.op not in binary or call.attrs.axis is None or [int(a) for a in call.attrs.axis] != [0]:
                return call
            if bool(call.attrs.keepdims):
                return call
            stacked = self.bound(call.args[0])
            if not isinstance(stacked, relax.Call) or stacked.op != stack or int(stacked.attrs.axis) != 0:
                return call
            items = self.bound(stacked.args[0])
            if not isinstance(items, relax.Tuple) or len(items.fields) < 2:
                return call
            xs = []
            for field in items.fields:
                inner = self.bound(field)
                xs.append(inner.args[0] if isinstance(inner, relax.Call) and inner.op == broadcast else field)
            acc = xs[0]
            for x in xs[1:]:
                acc = self.builder_.emit(binary[call.op](acc, x))
            if call.op == mean:
                acc = self.builder_.emit(relax.op.divide(acc, relax.const(len(xs), str(call.ty.dtype))))
            # the pairwise broadcast is the importer's broadcast shape; anything else: leave it
            return acc if tvm_ffi.structural_equal(acc.ty, call.ty) else call

    return relax.transform.DeadCodeElimination()(visit_relax_functions(Unstack(mod), mod))


def bound_gathers(mod: Any) -> Any:
    """``take(x, i, mode="fast")`` with indices computed at run time -> ``mode="nan"`` for float ``x``
    (an out-of-range index gives NaN rows), ``"clip"`` otherwise. The ONNX importer makes every
    Gather a fast take, which reads out of bounds, and can crash the process, on an index past the
    table (a token id past an embedding's vocabulary, where ONNX Runtime reports an error).
    Negative indices are already wrapped by the importer; the bound check is one compare per
    index."""
    import tvm
    from tvm import relax
    from tvm.ir.expr import Constant

    take = tvm.ir.Op.get("relax.take")

    @relax.expr_functor.mutator
    class Bound(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if call.op != take or str(call.attrs.mode) != "fast" or isinstance(call.args[1], Constant):
                return call
            axis = None if call.attrs.axis is None else int(call.attrs.axis)
            mode = "nan" if str(call.args[0].ty.dtype).startswith(("float", "bfloat")) else "clip"
            return relax.op.take(call.args[0], call.args[1], axis, mode)

    return visit_relax_functions(Bound(mod), mod)


#: Elementwise ops a transpose moves through unchanged (``f(permute(x)) = permute(f(x))``).
_UNARY = (
    "relax.nn.relu",
    "relax.clip",
    "relax.sigmoid",
    "relax.tanh",
    "relax.nn.silu",
    "relax.nn.gelu",
    "relax.astype",
    "relax.round",
    "relax.floor",
    "relax.exp",
    "relax.negative",
    "relax.abs",
)
#: Elementwise binary ops: both operands permuted alike, or one a broadcast operand of known shape.
_BINARY = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum")


def _rank(expr: Any) -> int | None:
    try:
        return len(expr.ty.shape)
    except (AttributeError, TypeError):
        return None


def _pool_in_nhwc(call: Any, x: Any, p: list[int], pool: Any) -> Any:
    """NCHW max/avg pooling ``call`` of NHWC data ``x`` made NCHW by ``permute_dims(x, p)``: the
    same pooling in NHWC on ``x``, or None."""
    a = call.attrs
    if p != [0, 3, 1, 2] or (a.layout, a.out_layout or a.layout) != ("NCHW", "NCHW"):
        return None
    return pool(
        x,
        [int(v) for v in a.pool_size],
        [int(v) for v in a.strides],
        [int(v) for v in a.padding],
        [int(v) for v in a.dilation],
        bool(a.ceil_mode),
        bool(a.count_include_pad),
        "NHWC",
        "NHWC",
    )


def _qdq_unpermuted(call: Any, x: Any, p: list[int], qdq: Any) -> Any:
    """QDQ ``call`` (per-tensor or per-axis scale and zero point) of ``permute_dims(x, p)``, on
    ``x`` with its channel axis remapped, or None."""
    if any(_rank(a) not in (0, 1) for a in call.args[1:]):
        return None
    axis = int(call.attrs.axis) % len(p)
    return qdq(x, call.args[1], call.args[2], p[axis], str(call.attrs.out_dtype))


def _other_operand(builder: Any, y: Any, y_permuted: tuple[Any, list[int]] | None, p: list[int]) -> Any:
    """The second operand ``y`` of a binary op whose first is ``permute_dims(x, p)``, as the
    operand of the op on ``x``: ``y``'s own input where ``y`` is permuted alike (``y_permuted``),
    else ``y`` of static shape (a broadcast operand) permuted back; None otherwise."""
    from tvm import relax

    if y_permuted is not None:
        return y_permuted[0] if y_permuted[1] == p else None
    try:
        shape = [int(d) for d in y.ty.shape]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(shape) > len(p):
        return None
    full = [1] * (len(p) - len(shape)) + shape
    inverse = [p.index(i) for i in range(len(p))]
    y = relax.op.reshape(y, full) if full != shape else y
    return builder.emit(relax.op.permute_dims(y, inverse))


def sink_transposes(mod: Any) -> Any:
    """Move ``permute_dims`` below elementwise ops: ``f(permute_dims(x, p))`` ->
    ``permute_dims(f(x), p)`` for unary ops, QDQ ``quantize``/``dequantize`` (their channel axis
    remapped), binary ops whose other operand is permuted the same way or is a broadcast
    operand of static shape (permuted back, which constant folding absorbs), and NCHW max/avg
    pooling of NHWC data (pooled in NHWC instead). ConvertLayout leaves
    a transpose back to NCHW after every NHWC convolution whose consumer it does not convert (a
    QDQ chain, for instance); moved down, it meets the next convolution's transpose to NHWC and
    :func:`cancel_transposes` removes both. Repeats until nothing moves."""
    import tvm
    from tvm import relax

    permute = tvm.ir.Op.get("relax.permute_dims")
    unary = {tvm.ir.Op.get(n) for n in _UNARY}
    binary = {tvm.ir.Op.get(n) for n in _BINARY}
    qdq = {tvm.ir.Op.get("relax.quantize"): relax.op.quantize, tvm.ir.Op.get("relax.dequantize"): relax.op.dequantize}
    pools = {
        tvm.ir.Op.get("relax.nn.max_pool2d"): relax.op.nn.max_pool2d,
        tvm.ir.Op.get("relax.nn.avg_pool2d"): relax.op.nn.avg_pool2d,
    }
    moved = [0]

    @relax.expr_functor.mutator
    class Sink(relax.PyExprMutator):
        def permuted(self, expr: Any) -> tuple[Any, list[int]] | None:
            inner = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
            if not isinstance(inner, relax.Call) or inner.op != permute or inner.attrs.axes is None:
                return None
            return inner.args[0], [int(a) for a in inner.attrs.axes]

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if call.op not in unary and call.op not in binary and call.op not in qdq and call.op not in pools:
                return call
            first = self.permuted(call.args[0])
            if first is None:
                return call
            x, p = first
            if call.op in pools:  # NCHW pooling of NHWC data made NCHW: pool in NHWC instead
                new = _pool_in_nhwc(call, x, p, pools[call.op])
            elif call.op in unary:
                new = relax.Call(call.op, [x, *call.args[1:]], call.attrs)
            elif call.op in qdq:
                new = _qdq_unpermuted(call, x, p, qdq[call.op])
            else:
                other = _other_operand(self.builder_, call.args[1], self.permuted(call.args[1]), p)
                new = None if other is None else relax.Call(call.op, [x, other], call.attrs)
            if new is None:
                return call
            moved[0] += 1
            return relax.op.permute_dims(self.builder_.emit(new), p)

    for _ in range(64):  # each round moves every transpose past at least one op
        moved[0] = 0
        mod = relax.transform.DeadCodeElimination()(visit_relax_functions(Sink(mod), mod))
        if not moved[0]:
            break
    return mod


def visit_relax_functions(mutator: Any, mod: Any) -> Any:
    """Run a ``relax.PyExprMutator`` (built on ``mod``) over every Relax function of ``mod`` and
    return the rewritten module (PrimFuncs the mutator added included)."""
    from tvm import relax

    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def static_shape(expr: Any, dtype: str | None = None) -> list[int] | None:
    """The static shape of a Relax ``expr`` (whose element type is ``dtype``, when given), else
    None: the check every kernel rewrite makes on its operands."""
    try:
        if dtype is not None and str(expr.ty.dtype) != dtype:
            return None
        return [int(d) for d in expr.ty.shape]
    except (AttributeError, TypeError, ValueError):
        return None


def rewrite_calls(mod: Any, ops: Sequence[Any], rewrite: Any) -> tuple[Any, bool]:
    """The common driver of graphslim's call rewrites: ``rewrite(builder, call, bound)`` on every
    call to one of ``ops`` in every Relax function of ``mod``, operands first (``bound(expr)``
    gives the value a variable is bound to, or ``expr``). It returns the replacement, or None to
    keep the call; an AttributeError, TypeError or ValueError while it inspects the call means
    "not the pattern" and keeps it too. Returns ``(module, changed)``, dead bindings removed."""
    from tvm import relax

    changed = [0]

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def bound(self, expr: Any) -> Any:
            return self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not any(call.op == op for op in ops):
                return call
            try:
                new = rewrite(self.builder_, call, self.bound)
            except (AttributeError, TypeError, ValueError):  # not the pattern
                new = None
            if new is None:
                return call
            changed[0] += 1
            return new

    new = visit_relax_functions(Rewriter(mod), mod)
    if not changed[0]:
        return mod, False
    return relax.transform.DeadCodeElimination()(new), True
