"""Ops that move channels between positions or axes without computing on them.

- Concat on the channel axis: the output's channels are the inputs' channels at their
  offsets; on another axis the inputs' channels are aligned (united).
- Split / Slice on the channel axis: each output holds a range of the input's channels;
  surgery rewrites split sizes and slice bounds to the kept counts. Slices with a step
  other than 1 on the channel axis block.
- Flatten / Reshape: channel c of a [N, C, H, W] tensor becomes the H*W consecutive
  features [c*H*W, (c+1)*H*W) of the flattened axis; surgery rewrites literal target
  sizes. A reshape that splits the channel axis (channel shuffle, detection heads) blocks.
- Transpose / Squeeze / Unsqueeze: the channel axis moves.
- Shape / Size: read only the shape; no channel relation.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.analysis.context import AnalysisContext
from onnxprune.ops._torch import attr_ints, int_list, present, torch, unsupported
from onnxprune.ops.registry import OpHandler, register
from onnxprune.surgery.context import SurgeryContext


def _axes_input(node: gs.Node, ctx, index: int, attr: str = "axes") -> list[int] | None:
    if attr in node.attrs:
        return [int(a) for a in node.attrs[attr]]
    if len(node.inputs) > index and node.inputs[index].name:
        v = ctx.const(node.inputs[index])
        return None if v is None else [int(a) for a in np.asarray(v).reshape(-1).tolist()]
    return []


@register("Concat")
class ConcatHandler(OpHandler):
    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        tracked = [ctx.get(t) for t in node.inputs if ctx.get(t) is not None]
        if not tracked:
            return
        y = node.outputs[0]
        rank = len(ctx.shape(y))
        axis = int(node.attrs.get("axis", 0)) % rank
        if len({tc.axis for tc in tracked}) != 1:
            ctx.block_inputs(node, f"Concat {node.name} joins tensors with channels on different axes")
            return
        ch = tracked[0].axis
        why = f"Concat {node.name} joins an untracked tensor"
        parts = [ctx.get_or_fixed(node, t, ch, why) for t in node.inputs if t.name]
        if axis == ch:
            ctx.set(y, ch, np.concatenate(parts))
            return
        for p in parts[1:]:
            ctx.space.union(parts[0], p)
        ctx.set(y, ch, parts[0])

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Concat follows its inputs' shapes."""

    def evaluate(self, node, inputs, ctx):
        xs = [t for t in inputs if t is not None]
        axis = int(node.attrs.get("axis", 1 if ctx.opset < 4 else 0))
        rank = max(t.dim() for t in xs)
        # 1-D empty tensors join anything (shape arithmetic); drop them unless all are
        nonempty = [t for t in xs if not (t.dim() == 1 and t.numel() == 0 and rank > 1)] or xs
        return [torch.cat(nonempty, dim=axis % rank)]



@register("Split")
class SplitHandler(OpHandler):
    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = node.inputs[0]
        tc = ctx.get(x)
        if tc is None:
            return
        axis = int(node.attrs.get("axis", 0)) % ctx.rank(x)
        outs = [o for o in node.outputs]
        if axis != tc.axis:
            for o in outs:
                ctx.set(o, tc.axis, tc.elems)
            return
        if len(node.inputs) > 1 and node.inputs[1].name and ctx.const(node.inputs[1]) is None:
            ctx.block(x, f"Split {node.name} has non-constant split sizes")
            return
        start = 0
        for o in outs:
            n = ctx.shape(o)[axis]
            ctx.set(o, axis, tc.elems[start:start + n])
            start += n

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        x = node.inputs[0]
        if ctx.keep(x) is None or int(node.attrs.get("axis", 0)) % ctx.rank(x) != ctx.axis(x):
            return
        sizes = [ctx.kept_count(o) for o in node.outputs]
        node.attrs.pop("num_outputs", None)
        if "split" in node.attrs or ctx.opset < 13:
            node.attrs["split"] = sizes
        elif len(node.inputs) > 1 and node.inputs[1].name:
            ctx.set_const(node, 1, np.array(sizes, dtype=np.int64))
        else:
            node.inputs.append(gs.Constant(f"{node.name}__split", np.array(sizes, dtype=np.int64)))

    def evaluate(self, node, inputs, ctx):
        x = inputs[0]
        axis = int(node.attrs.get("axis", 0)) % x.dim()
        dim = x.shape[axis]
        sizes = attr_ints(node, "split")
        if sizes is None and len(inputs) > 1 and inputs[1] is not None:
            sizes = int_list(inputs[1])
        if not sizes:
            n = int(node.attrs.get("num_outputs", node.n_outputs))
            chunk = -(-dim // n)  # opset 18: the last chunk may be smaller
            sizes = [min(chunk, max(dim - i * chunk, 0)) for i in range(n)]
        return list(torch.split(x, sizes, dim=axis))



def _slice_params(node: gs.Node, ctx, rank: int):
    """(starts, ends, axes, steps) as int lists, or None when any is not constant."""
    if ctx.opset < 10:
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        axes = node.attrs.get("axes", list(range(len(starts))))
        return list(starts), list(ends), [a % rank for a in axes], [1] * len(starts)
    vals = []
    for i in range(1, 5):
        if len(node.inputs) > i and node.inputs[i].name:
            v = ctx.const(node.inputs[i])
            if v is None:
                return None
            vals.append([int(a) for a in np.asarray(v).reshape(-1).tolist()])
        else:
            vals.append(None)
    starts, ends, axes, steps = vals
    axes = list(range(len(starts))) if axes is None else [a % rank for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    return starts, ends, axes, steps


@register("Slice")
class SliceHandler(OpHandler):
    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tc = ctx.get(x)
        if tc is None:
            return
        p = _slice_params(node, ctx, ctx.rank(x))
        if p is None:
            ctx.block(x, f"Slice {node.name} has non-constant bounds")
            return
        starts, ends, axes, steps = p
        if tc.axis not in axes:
            ctx.set(y, tc.axis, tc.elems)
            return
        i = axes.index(tc.axis)
        if steps[i] != 1:
            ctx.block(x, f"Slice {node.name} steps over channels")
            return
        ctx.set(y, tc.axis, tc.elems[slice(starts[i], ends[i], 1)])

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        x = node.inputs[0]
        keep = ctx.keep(x)
        if keep is None:
            return
        ch = ctx.axis(x)
        n = len(keep)
        rank = ctx.rank(x)
        starts, ends, axes, _ = _slice_params(node, ctx, rank)
        if ch not in axes:
            return
        i = axes.index(ch)
        s, e, _ = slice(starts[i], ends[i], 1).indices(n)
        new_s = int(keep[:s].sum())
        new_e = new_s + int(keep[s:max(e, s)].sum())
        starts, ends = list(starts), list(ends)
        starts[i], ends[i] = new_s, new_e
        if ctx.opset < 10:
            node.attrs["starts"], node.attrs["ends"] = starts, ends
        else:
            ctx.set_const(node, 1, np.array(starts, dtype=ctx.const(node.inputs[1]).dtype))
            ctx.set_const(node, 2, np.array(ends, dtype=ctx.const(node.inputs[2]).dtype))

    def evaluate(self, node, inputs, ctx):
        x = inputs[0]
        rank = x.dim()
        if ctx.opset < 10:
            starts, ends = attr_ints(node, "starts"), attr_ints(node, "ends")
            axes = attr_ints(node, "axes", list(range(len(starts))))
            steps = [1] * len(starts)
        else:
            starts, ends = int_list(inputs[1]), int_list(inputs[2])
            ax_t, st_t = present(inputs, 3), present(inputs, 4)
            axes = int_list(ax_t) if ax_t is not None else list(range(len(starts)))
            steps = int_list(st_t) if st_t is not None else [1] * len(starts)
        index = [slice(None)] * rank
        gathers = []
        for s, e, a, st in zip(starts, ends, axes, steps):
            a %= rank
            n = x.shape[a]
            if st == 0:
                raise unsupported(node, "step 0")
            s = s + n if s < 0 else s
            e = e + n if e < 0 else e
            if st > 0:
                index[a] = slice(min(max(s, 0), n), min(max(e, 0), n), st)
            else:
                s, e = min(max(s, 0), n - 1), min(max(e, -1), n - 1)
                gathers.append((a, torch.arange(s, e, st, dtype=torch.int64)))
        y = x[tuple(index)]
        for a, idx in gathers:
            y = y.index_select(a, idx.to(y.device))
        return [y]



def _reshape_map(in_shape, out_shape, ch: int) -> tuple[int, int] | None:
    """(output axis, repeat) where input axis ``ch`` lands after a row-major reshape.

    Output position p of that axis holds input channel p // repeat. None when the
    channel axis is split across output axes. With more than one channel the answer is
    unique; a single channel fits every size-1 axis next to it (``[1, 1, 4, 4] -> [1, 16]``
    fits axes 0 and 1), and then axis ``ch`` is preferred, else the first fit.
    """
    prefix = math.prod(in_shape[:ch])
    inner_in = math.prod(in_shape[ch + 1:])
    acc = 1
    fits = []
    for j, d in enumerate(out_shape):
        if acc == prefix and d % in_shape[ch] == 0:
            rest = math.prod(out_shape[j + 1:])
            if rest and inner_in % rest == 0 and d == in_shape[ch] * (inner_in // rest):
                fits.append((j, inner_in // rest))
        acc *= d
        if acc > prefix:
            break
    for f in fits:
        if f[0] == ch:
            return f
    return fits[0] if fits else None


@register("Flatten", "Reshape")
class ReshapeHandler(OpHandler):
    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tc = ctx.get(x)
        if tc is None:
            return
        xs, ys = ctx.shape(x), ctx.shape(y)
        if node.op == "Reshape" and ctx.const(node.inputs[1]) is None:
            ctx.block(x, f"Reshape {node.name} has a non-constant target shape")
            return
        m = _reshape_map(xs, ys, tc.axis)
        if m is None:
            ctx.block(x, f"{node.op} {node.name} splits the channel axis")
            return
        j, rep = m
        ctx.set(y, j, np.repeat(tc.elems, rep))

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        y = node.outputs[0]
        keep = ctx.keep(y)
        if node.op != "Reshape" or keep is None:
            return
        shape = ctx.const(node.inputs[1]).copy()
        j = ctx.axis(y)
        if shape[j] > 0:  # 0 copies the (already sliced) input dim; -1 is inferred
            shape[j] = int(keep.sum())
            ctx.set_const(node, 1, shape)

    def evaluate(self, node, inputs, ctx):
        x = inputs[0]
        if node.op == "Flatten":
            axis = int(node.attrs.get("axis", 1))
            axis = axis + x.dim() if axis < 0 else axis
            return [x.reshape(int(math.prod(x.shape[:axis])), int(math.prod(x.shape[axis:])))]
        shape = attr_ints(node, "shape") if ctx.opset < 5 else int_list(inputs[1])
        if not int(node.attrs.get("allowzero", 0)):
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return [x.reshape(shape)]



@register("Transpose")
class TransposeHandler(OpHandler):
    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        tc = ctx.get(node.inputs[0])
        if tc is None:
            return
        rank = ctx.rank(node.inputs[0])
        perm = list(node.attrs.get("perm", list(range(rank))[::-1]))
        ctx.set(node.outputs[0], perm.index(tc.axis), tc.elems)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Nothing to slice."""

    def evaluate(self, node, inputs, ctx):
        x = inputs[0]
        perm = attr_ints(node, "perm", list(range(x.dim()))[::-1])
        return [x.permute(perm)]



@register("Squeeze", "Unsqueeze")
class SqueezeHandler(OpHandler):
    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tc = ctx.get(x)
        if tc is None:
            return
        axes = _axes_input(node, ctx, 1)
        if axes is None:
            ctx.block(x, f"{node.op} {node.name} has non-constant axes")
            return
        if node.op == "Squeeze":
            rank = ctx.rank(x)
            axes = [a % rank for a in axes] or [i for i, d in enumerate(ctx.shape(x)) if d == 1]
            if tc.axis in axes:
                ctx.block(x, f"Squeeze {node.name} removes the channel axis")
                return
            ctx.set(y, tc.axis - sum(1 for a in axes if a < tc.axis), tc.elems)
        else:
            out_rank = ctx.rank(y)
            inserted = sorted(a % out_rank for a in axes)
            kept_axes = [i for i in range(out_rank) if i not in inserted]
            ctx.set(y, kept_axes[tc.axis], tc.elems)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Nothing to slice."""

    def evaluate(self, node, inputs, ctx):
        x = inputs[0]
        axes = attr_ints(node, "axes")
        if axes is None and len(inputs) > 1 and inputs[1] is not None:
            axes = int_list(inputs[1])
        if node.op == "Squeeze":
            rank = x.dim()
            drop = {a % rank for a in axes} if axes else {i for i, d in enumerate(x.shape) if d == 1}
            return [x.reshape([d for i, d in enumerate(x.shape) if i not in drop])]
        out_rank = x.dim() + len(axes)
        ins = {a % out_rank for a in axes}
        dims = iter(x.shape)
        return [x.reshape([1 if i in ins else next(dims) for i in range(out_rank)])]



@register("Shape", "Size")
class ShapeHandler(OpHandler):
    """Reads only the shape, which follows the pruned tensor at run time."""

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        """No channel relation."""

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Nothing to slice."""

    def evaluate(self, node, inputs, ctx):
        x = inputs[0]
        if node.op == "Size":
            return [torch.tensor(x.numel(), dtype=torch.int64, device=x.device)]
        rank = x.dim()
        start = int(node.attrs.get("start", 0))
        end = node.attrs.get("end")
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = rank if end is None else int(end)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        return [torch.tensor(list(x.shape[start:end]), dtype=torch.int64, device=x.device)]
