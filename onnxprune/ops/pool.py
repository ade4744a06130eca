"""Per-channel spatial ops and reductions.

- pooling (MaxPool, AveragePool, LpPool, their Global forms), Resize/Upsample, Pad,
  SpaceToDepth is *not* here (it mixes channels): channel c of the output is channel c
  of the input, provided nothing is resized or padded along the channel axis.
- reductions (ReduceMean, ReduceSum, ..., ArgMax) and Softmax-like ops: pass channels
  through when they act on other axes, block them when they reduce or normalise across
  the channel axis (channel c's removal would change every other channel's value).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.analysis.context import AnalysisContext
from onnxprune.ops._torch import (F, attr_ints, attr_str, auto_pads, float_list, int_list, pool_out_size,
                                  present, torch, torch_pad_arg, unsupported)
from onnxprune.ops.registry import OpHandler, register
from onnxprune.surgery.context import SurgeryContext


_GLOBAL_MEAN = None


def _global_mean(x):
    """``x.mean`` over every axis after the channel axis, keepdim; with grad, its backward
    hands out the output gradient / count *expanded* (a broadcast view) instead of a
    full-size tensor: autograd then adds it straight into the input's other gradient (the
    Mul of a squeeze-excitation block), one pass over the activation instead of two."""
    global _GLOBAL_MEAN
    dims = tuple(range(2, x.dim()))
    if not (torch.is_grad_enabled() and x.requires_grad and x.is_floating_point()):
        return x.mean(dim=dims, keepdim=True)
    if _GLOBAL_MEAN is None:

        class GlobalMean(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                ctx.shape = t.shape
                return t.mean(dim=tuple(range(2, t.dim())), keepdim=True)

            @staticmethod
            def backward(ctx, go):
                return (go / math.prod(ctx.shape[2:])).expand(ctx.shape)

        _GLOBAL_MEAN = GlobalMean
    return _GLOBAL_MEAN.apply(x)


def _passthrough(node: gs.Node, ctx: AnalysisContext, axis: int | None = None) -> None:
    tc = ctx.get(node.inputs[0])
    if tc is None:
        return
    for out in node.outputs:
        if out.name:
            ctx.set(out, tc.axis if axis is None else axis, tc.elems)


@register("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "LRN")
class PoolHandler(OpHandler):
    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        tc = ctx.get(node.inputs[0])
        if tc is None:
            return
        if tc.axis != 1 or node.op == "LRN":
            ctx.block(node.inputs[0], f"{node.op} {node.name} mixes or moves channels")
            return
        _passthrough(node, ctx)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Nothing to slice."""

    def evaluate(self, node, inputs, ctx):
        x = inputs[0]
        op = node.op
        if op == "GlobalAveragePool":
            return [_global_mean(x)]
        if op == "GlobalMaxPool":
            return [x.amax(dim=tuple(range(2, x.dim())), keepdim=True)]
        if op == "GlobalLpPool":
            p = float(node.attrs.get("p", 2))
            return [torch.linalg.vector_norm(x, ord=p, dim=tuple(range(2, x.dim())), keepdim=True)]
        if op == "LRN":
            return [_lrn(node, x)]
        return _pool(node, x, ctx)


@register("MaxRoiPool")
class MaxRoiPoolHandler(PoolHandler):
    """Channels as for pooling; no torch evaluation (TorchGraph refuses the model)."""

    evaluate = None


@register("Resize", "Upsample")
class ResizeHandler(OpHandler):
    """Resize keeps channels when its scale along the channel axis is 1.

    A constant ``sizes`` input holds the channel count; surgery rewrites it.
    """

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tc = ctx.get(x)
        if tc is None:
            return
        xs, ys = ctx.shape(x), ctx.shape(y)
        if xs is None or ys is None or xs[tc.axis] != ys[tc.axis]:
            ctx.block(x, f"{node.op} {node.name} resizes the channel axis")
            return
        if node.op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name and ctx.const(node.inputs[3]) is None:
            ctx.block(x, f"Resize {node.name} has non-constant sizes")
            return
        _passthrough(node, ctx)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        keep = ctx.keep(node.inputs[0])
        if keep is None or node.op != "Resize" or len(node.inputs) <= 3:
            return
        sizes = ctx.const(node.inputs[3])
        if sizes is not None and sizes.size:
            new = sizes.copy()
            new[ctx.axis(node.inputs[0])] = int(keep.sum())
            ctx.set_const(node, 3, new)

    def evaluate(self, node, inputs, ctx):
        return [_resize(node, inputs, ctx)]



@register("Pad")
class PadHandler(OpHandler):
    """Pad keeps channels when it pads nothing on the channel axis."""

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = node.inputs[0]
        tc = ctx.get(x)
        if tc is None:
            return
        pads = node.attrs.get("pads") if ctx.opset < 11 else (
            ctx.const(node.inputs[1]) if len(node.inputs) > 1 else None)
        rank = ctx.rank(x)
        axes = list(range(rank))
        if len(node.inputs) > 3 and node.inputs[3].name:
            av = ctx.const(node.inputs[3])
            axes = None if av is None else [int(a) % rank for a in av.tolist()]
        if pads is None or axes is None:
            ctx.block(x, f"Pad {node.name} has non-constant pads")
            return
        pads = np.asarray(pads).tolist()
        k = len(axes)
        for i, a in enumerate(axes):
            if a == tc.axis and (pads[i] != 0 or pads[i + k] != 0):
                ctx.block(x, f"Pad {node.name} pads the channel axis")
                return
        _passthrough(node, ctx)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Nothing to slice."""

    def evaluate(self, node, inputs, ctx):
        return [_pad(node, inputs, ctx)]



_REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin")


def _reduce_axes(node: gs.Node, ctx: AnalysisContext, rank: int) -> list[int] | None:
    if node.op in ("ArgMax", "ArgMin"):
        return [int(node.attrs.get("axis", 0)) % rank]
    if "axes" in node.attrs:
        return [int(a) % rank for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and node.inputs[1].name:
        v = ctx.const(node.inputs[1])
        return None if v is None else [int(a) % rank for a in v.tolist()]
    if int(node.attrs.get("noop_with_empty_axes", 0)):
        return []
    return list(range(rank))


@register(*_REDUCE)
class ReduceHandler(OpHandler):
    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = node.inputs[0]
        tc = ctx.get(x)
        if tc is None:
            return
        axes = _reduce_axes(node, ctx, ctx.rank(x))
        if axes is None or tc.axis in axes:
            ctx.block(x, f"{node.op} {node.name} reduces across channels")
            return
        keep = int(node.attrs.get("keepdims", 1))
        axis = tc.axis if keep else tc.axis - sum(1 for a in axes if a < tc.axis)
        _passthrough(node, ctx, axis)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Nothing to slice."""

    def evaluate(self, node, inputs, ctx):
        return [_reduce(node, inputs, ctx)]



@register("Softmax", "LogSoftmax", "Hardmax")
class SoftmaxHandler(OpHandler):
    """Softmax along the channel axis mixes channels; along another axis it does not."""

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = node.inputs[0]
        tc = ctx.get(x)
        if tc is None:
            return
        rank = ctx.rank(x)
        if ctx.opset < 13:  # coerced to 2-D: axes [axis, rank) are normalised together
            axis = int(node.attrs.get("axis", 1)) % rank
            mixes = tc.axis >= axis
        else:
            mixes = tc.axis == int(node.attrs.get("axis", -1)) % rank
        if mixes:
            ctx.block(x, f"{node.op} {node.name} normalises across channels")
            return
        _passthrough(node, ctx)

    def apply(self, node: gs.Node, ctx: SurgeryContext) -> None:
        """Nothing to slice."""

    def evaluate(self, node, inputs, ctx):
        x = inputs[0]
        rank = x.dim()
        if ctx.opset < 13:  # coerced to 2-D [prod(shape[:axis]), prod(shape[axis:])]
            axis = int(node.attrs.get("axis", 1)) % max(rank, 1)
            y = _softmax_like(node.op, x.reshape(int(math.prod(x.shape[:axis])), -1), 1)
            return [y.reshape(x.shape)]
        return [_softmax_like(node.op, x, int(node.attrs.get("axis", -1)) % max(rank, 1))]


# ---- torch evaluation ------------------------------------------------------------------
def _window_sum(t, kernel, strides, dil):
    """Sum of ``t`` [N, C, ...] over each pooling window (no padding)."""
    n = t.dim() - 2
    c = t.shape[1]
    w = torch.ones((c, 1) + tuple(kernel), dtype=t.dtype, device=t.device)
    fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return fn(t, w, None, strides, 0, dil, c)


def _pool(node, x, ctx):
    """MaxPool / AveragePool / LpPool with ONNX padding, ceil_mode and dilations."""
    n = x.dim() - 2
    if n not in (1, 2, 3):
        raise unsupported(node, f"{n}-D pooling")
    op = node.op
    sizes = list(x.shape[2:])
    spec = node.cache.get("pool")
    if spec is None or spec[0] != sizes:  # attributes parsed once per input size
        spec = node.cache["pool"] = (sizes, _pool_spec(node, n, sizes))
    kernel, strides, dil, begin, end, out, end_full = spec[1]
    if any(o <= 0 for o in out):  # no window fits: empty outputs
        shape = tuple(x.shape[:2]) + tuple(max(o, 0) for o in out)
        empty = [x.new_zeros(shape), torch.zeros(shape, dtype=torch.int64, device=x.device)]
        return empty[: max(1, node.n_outputs)]
    # torch's own padding: symmetric, at most half the (undilated) kernel
    native = all(b == e and b <= k // 2 for b, e, k in zip(begin, end_full, kernel))

    if op == "MaxPool":
        if int(node.attrs.get("storage_order", 0)) and node.n_outputs > 1:
            raise unsupported(node, "storage_order=1 with indices")
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
        want_idx = node.n_outputs > 1
        if native:
            xp, padding = x, begin
        else:
            xp, padding = F.pad(x, torch_pad_arg(begin, end_full), value=float("-inf")), [0] * n
        res = fn(xp, kernel, strides, padding, dil, False, want_idx)
        y, idx = (res if want_idx else (res, None))
        y = _crop(y, out)
        if not want_idx:
            return [y]
        return [y, _onnx_pool_indices(_crop(idx, out), x, xp, [0] * n if native else begin)]

    if op == "AveragePool":
        cip = int(node.attrs.get("count_include_pad", 0))
        # torch counts the ceil_mode overhang as padding; ONNX counts only explicit pads
        if native and all(d == 1 for d in dil) and (not cip or end_full == end):
            fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
            return [_crop(fn(x, kernel, strides, begin, False, bool(cip)), out)]
        total = _window_sum(F.pad(x, torch_pad_arg(begin, end_full)), kernel, strides, dil)
        mask = torch.ones((1, 1) + tuple(sizes), dtype=x.dtype, device=x.device)
        if cip:  # explicit pads count, the ceil_mode overhang does not
            mask = F.pad(mask, torch_pad_arg(begin, end), value=1.0)
            mask = F.pad(mask, torch_pad_arg([0] * n, [ef - e for ef, e in zip(end_full, end)]))
        else:
            mask = F.pad(mask, torch_pad_arg(begin, end_full))
        count = _window_sum(mask, kernel, strides, dil)
        return [_crop(total / count, out)]

    if op == "LpPool":
        p = float(node.attrs.get("p", 2))
        xp = F.pad(x.abs().pow(p), torch_pad_arg(begin, end_full))
        return [_crop(_window_sum(xp, kernel, strides, dil), out).pow(1.0 / p)]
    raise unsupported(node, op)


def _pool_spec(node, n: int, sizes: list[int]):
    """(kernel, strides, dilations, begin pads, end pads, output sizes, end pads of the
    equivalent floor-mode pooling) of a pooling node on spatial ``sizes``."""
    kernel = attr_ints(node, "kernel_shape")
    strides = attr_ints(node, "strides", [1] * n)
    dil = attr_ints(node, "dilations", [1] * n)
    ceil_mode = bool(int(node.attrs.get("ceil_mode", 0)))
    pads = auto_pads(node, sizes, kernel, strides, dil)
    begin, end = pads[:n], pads[n:]
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    out = [pool_out_size(sizes[i], kernel[i], strides[i], dil[i], begin[i], end[i], ceil_mode) for i in range(n)]
    # end padding that makes a floor-mode pooling produce ``out`` windows
    end_full = [max(end[i], (out[i] - 1) * strides[i] + eff[i] - sizes[i] - begin[i]) for i in range(n)]
    return kernel, strides, dil, begin, end, out, end_full


def _crop(y, out):
    """``y`` [N, C, ...] cut to the spatial sizes ``out`` (no-op when they already match)."""
    for i, o in enumerate(out):
        if y.shape[2 + i] != o:
            y = y.narrow(2 + i, 0, o)
    return y


def _onnx_pool_indices(idx, x, xp, begin):
    """torch max-pool indices (flat within each padded plane) -> ONNX flat indices of ``x``."""
    n = x.dim() - 2
    sizes, psizes = list(x.shape[2:]), list(xp.shape[2:])
    rem = idx
    coords = []
    for i in reversed(range(n)):
        coords.append(rem % psizes[i] - begin[i])
        rem = rem // psizes[i]
    coords.reverse()
    flat = torch.zeros_like(idx)
    for i in range(n):
        flat = flat * sizes[i] + coords[i]
    plane = int(math.prod(sizes))
    nc = torch.arange(x.shape[0] * x.shape[1], device=x.device, dtype=idx.dtype).reshape(
        (x.shape[0], x.shape[1]) + (1,) * n)
    return flat + nc * plane


def _lrn(node, x):
    """ONNX LRN: square sums over channels [c - floor((size-1)/2), c + ceil((size-1)/2)]."""
    size = int(node.attrs["size"])
    alpha = float(node.attrs.get("alpha", 1e-4))
    beta = float(node.attrs.get("beta", 0.75))
    bias = float(node.attrs.get("bias", 1.0))
    front = (size - 1) // 2
    back = size - 1 - front
    sq = (x * x).reshape(x.shape[0], 1, x.shape[1], -1)
    sq = F.pad(sq, (0, 0, front, back))
    mean = F.avg_pool2d(sq, (size, 1), stride=1).reshape(x.shape)  # sum / size
    return x / (bias + alpha * mean).pow(beta)


_F32 = np.float32


def _source_coords(node, mode: str, out: int, size: int, scale: float, roi: tuple[float, float] | None):
    """Source coordinate (float32, as onnxruntime computes it) of each output position."""
    xr = np.arange(out, dtype=_F32)
    sc = _F32(scale)
    half = _F32(0.5)
    if mode == "half_pixel":
        return (xr + half) / sc - half
    if mode == "half_pixel_symmetric":  # float32 offset, the rest in double (as onnxruntime)
        adj = _F32(out) / (sc * _F32(size))
        center = _F32(size) / _F32(2)
        offset = center * (_F32(1) - adj)
        x64 = np.arange(out, dtype=np.float64)
        return (np.float64(offset) + (x64 + 0.5) / np.float64(sc) - 0.5).astype(_F32)
    if mode == "pytorch_half_pixel":
        return (xr + half) / sc - half if out > 1 else np.zeros(out, dtype=_F32)
    if mode == "align_corners":
        if out == 1:
            return np.zeros(out, dtype=_F32)
        return xr * _F32(size - 1) / _F32(out - 1)
    if mode == "asymmetric":
        return xr / sc
    if mode == "tf_half_pixel_for_nn":
        return (xr + half) / sc
    if mode == "tf_crop_and_resize":
        start, stop = _F32(roi[0]), _F32(roi[1])
        if out > 1:
            return start * _F32(size - 1) + xr * (stop - start) * _F32(size - 1) / _F32(out - 1)
        return np.full(out, 0.5 * (float(start) + float(stop)) * (size - 1), dtype=_F32)
    raise unsupported(node, f"coordinate_transformation_mode {mode}")


def _nearest_index(node, mode: str, c: np.ndarray, scale: float) -> np.ndarray:
    if mode == "simple":  # opsets < 11 (onnxruntime): ceil when downsampling, else truncate
        return np.ceil(c) if scale < 1 else np.trunc(c)
    if mode == "floor":
        return np.floor(c)
    if mode == "ceil":
        return np.ceil(c)
    # onnxruntime (1.31) treats coordinates within 1e-6 of k + 0.5 as half-way
    fl = np.floor(c.astype(np.float64))
    is_half = np.abs(c.astype(np.float64) - (fl + 0.5)) < 1e-6
    if mode == "round_prefer_floor":
        return np.where(is_half, fl, np.round(c))
    if mode == "round_prefer_ceil":
        return np.where(is_half, fl + 1, np.round(c))
    raise unsupported(node, f"nearest_mode {mode}")


def _cubic_coeffs(r: np.ndarray, a: float) -> np.ndarray:
    """Weights of taps floor(c)-1 .. floor(c)+2 for fractional offsets ``r`` (float32)."""
    a = _F32(a)
    one, two = _F32(1), _F32(2)

    def far(d):  # 1 <= |d| < 2
        return ((a * d - _F32(5) * a) * d + _F32(8) * a) * d - _F32(4) * a

    def near(d):  # |d| < 1
        return ((a + two) * d - (a + _F32(3))) * d * d + one

    return np.stack([far(r + one), near(r), near(one - r), far(two - r)], axis=1)


def _resize_axis(node, x, ax: int, out: int, scale: float, mode: str, coord: str, nearest: str,
                 cubic_a: float, exclude_outside: bool, roi, extrapolation: float):
    """Resize ``x`` along axis ``ax`` to ``out`` positions (separable interpolation)."""
    size = x.shape[ax]
    c = _source_coords(node, coord, out, size, scale, roi)
    valid = None
    if coord == "tf_crop_and_resize":
        valid = (c >= 0) & (c <= _F32(size - 1))
    if mode == "nearest":
        idx = np.clip(_nearest_index(node, nearest, c, scale), 0, size - 1).astype(np.int64)
        y = x.index_select(ax, torch.from_numpy(idx).to(x.device))
    else:
        if mode == "linear":
            cc = np.clip(c, _F32(0), _F32(size - 1))
            i0 = np.minimum(np.trunc(cc).astype(np.int64), size - 1)
            i1 = np.minimum(i0 + 1, size - 1)
            w1 = (cc - i0.astype(_F32)).astype(_F32)
            idx = np.stack([i0, i1], axis=1)
            w = np.stack([_F32(1) - w1, w1], axis=1)
        elif mode == "cubic":
            base = np.floor(c)
            w = _cubic_coeffs((c - base).astype(_F32), cubic_a)
            idx = base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
            if exclude_outside:
                w = np.where((idx >= 0) & (idx < size), w, _F32(0))
                w = w / w.sum(axis=1, keepdims=True)
            idx = np.clip(idx, 0, size - 1)
        else:
            raise unsupported(node, f"mode {mode}")
        shape = [1] * x.dim()
        shape[ax] = out
        y = None
        for t in range(idx.shape[1]):
            term = x.index_select(ax, torch.from_numpy(np.ascontiguousarray(idx[:, t])).to(x.device))
            term = term * torch.from_numpy(np.ascontiguousarray(w[:, t])).to(x.device, x.dtype).reshape(shape)
            y = term if y is None else y + term
    if valid is not None and not valid.all():
        shape = [1] * x.dim()
        shape[ax] = out
        m = torch.from_numpy(valid).to(x.device).reshape(shape)
        y = torch.where(m, y, torch.tensor(extrapolation, dtype=y.dtype, device=y.device))
    return y


def _pow2_upsample(x, mode: str, coord: str, nearest: str, in_sizes, out_sizes, scale_of):
    """(k_h, k_w) when a Resize is a nearest asymmetric/floor upsampling of the two spatial
    axes of a 4-D tensor by powers of two (exact in float: source = floor(dst * 2^-j)), else None."""
    if mode != "nearest" or coord != "asymmetric" or nearest != "floor" or x.dim() != 4:
        return None
    if out_sizes[:2] != in_sizes[:2]:
        return None
    ks = []
    for a in (2, 3):
        k = scale_of[a]
        if k < 1 or k != int(k) or int(k) & (int(k) - 1) or out_sizes[a] != in_sizes[a] * int(k):
            return None
        ks.append(float(k))
    return tuple(ks)


def _resize(node, inputs, ctx):
    x = inputs[0]
    rank = x.dim()
    in_sizes = list(x.shape)
    opset = ctx.opset
    mode = attr_str(node, "mode", "nearest")
    roi = None
    if node.op == "Upsample" or opset < 11:
        if node.op == "Upsample" and opset < 7:
            raise unsupported(node, f"Upsample of opset {opset}")
        scales = ([float(s) for s in node.attrs["scales"]] if node.op == "Upsample" and opset < 9
                  else float_list(inputs[1]))
        sizes = None
        coord, nearest = "asymmetric", "simple"
        if mode == "bilinear":
            mode = "linear"
        axes = list(range(rank))
    else:
        roi_t, scales_t, sizes_t = present(inputs, 1), present(inputs, 2), present(inputs, 3)
        scales = float_list(scales_t) if scales_t is not None and scales_t.numel() else None
        sizes = int_list(sizes_t) if sizes_t is not None and sizes_t.numel() else None
        coord = attr_str(node, "coordinate_transformation_mode", "half_pixel")
        nearest = attr_str(node, "nearest_mode", "round_prefer_floor")
        axes = [a % rank for a in attr_ints(node, "axes", list(range(rank)))]
        if coord == "tf_crop_and_resize":
            if roi_t is None or not roi_t.numel():
                raise unsupported(node, "tf_crop_and_resize without roi")
            r = float_list(roi_t)
            k = len(axes)
            roi = {a: (r[i], r[i + k]) for i, a in enumerate(axes)}
        if mode not in ("nearest", "linear", "cubic"):
            raise unsupported(node, f"mode {mode}")
        if int(node.attrs.get("antialias", 0)) and mode != "nearest":
            raise unsupported(node, "antialias=1")
    if sizes is None and scales is None:
        raise unsupported(node, "neither scales nor sizes")
    out_sizes = list(in_sizes)
    scale_of = [1.0] * rank
    if sizes is not None:
        policy = attr_str(node, "keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            for a, s in zip(axes, sizes):
                out_sizes[a] = int(s)
                scale_of[a] = float(_F32(s) / _F32(in_sizes[a]))
        elif policy in ("not_larger", "not_smaller"):
            ratios = [_F32(s) / _F32(in_sizes[a]) for a, s in zip(axes, sizes)]
            r = min(ratios) if policy == "not_larger" else max(ratios)
            for a in axes:
                out_sizes[a] = int(math.floor(float(r * _F32(in_sizes[a])) + 0.5))
                scale_of[a] = float(r)
        else:
            raise unsupported(node, f"keep_aspect_ratio_policy {policy}")
    else:
        for a, s in zip(axes, scales):
            scale_of[a] = float(s)
            # floor(scale * size); onnxruntime ignores the roi extent here (the spec
            # multiplies it in for tf_crop_and_resize)
            out_sizes[a] = int(np.floor(_F32(in_sizes[a]) * _F32(s)))
    cubic_a = float(node.attrs.get("cubic_coeff_a", -0.75))
    exclude = bool(int(node.attrs.get("exclude_outside", 0)))
    extrap = float(node.attrs.get("extrapolation_value", 0.0))
    if out_sizes == in_sizes and coord != "tf_crop_and_resize":
        return x  # onnxruntime copies the input whenever the shape does not change
    k = _pow2_upsample(x, mode, coord, nearest, in_sizes, out_sizes, scale_of)
    if k is not None:  # torch's kernel computes the same floor(dst / k) source indices
        return F.interpolate(x, scale_factor=k, mode="nearest")
    y = x
    for a in range(rank):
        r = roi.get(a, (0.0, 1.0)) if roi is not None else None
        if out_sizes[a] == in_sizes[a] and scale_of[a] == 1.0 and roi is None:
            continue
        y = _resize_axis(node, y, a, out_sizes[a], scale_of[a], mode, coord, nearest, cubic_a, exclude, r, extrap)
    return y


def _pad(node, inputs, ctx):
    x = inputs[0]
    rank = x.dim()
    mode = attr_str(node, "mode", "constant")
    if ctx.opset < 11:
        pads = attr_ints(node, "pads") or attr_ints(node, "paddings")
        value = float(node.attrs.get("value", 0.0))
        axes = list(range(rank))
    else:
        pads = int_list(inputs[1])
        cv = present(inputs, 2)
        value = cv.reshape(-1)[0] if cv is not None and cv.numel() else 0
        ax_t = present(inputs, 3)
        axes = [a % rank for a in int_list(ax_t)] if ax_t is not None else list(range(rank))
    k = len(axes)
    begin, end = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[i + k]
    if mode == "constant":
        v = value.item() if torch.is_tensor(value) else value
        return F.pad(x, torch_pad_arg(begin, end), value=v)
    # reflect / edge / wrap: crop negative pads, then gather along each padded axis
    y = x
    for a in range(rank):
        b, e = begin[a], end[a]
        if b < 0 or e < 0:
            y = y.narrow(a, max(-b, 0), y.shape[a] - max(-b, 0) - max(-e, 0))
            b, e = max(b, 0), max(e, 0)
        if b == 0 and e == 0:
            continue
        n = y.shape[a]
        pos = np.arange(-b, n + e)
        if mode == "edge":
            idx = np.clip(pos, 0, n - 1)
        elif mode == "reflect":
            if n == 1:
                idx = np.zeros_like(pos)
            else:
                period = 2 * (n - 1)
                idx = np.abs(pos) % period
                idx = np.where(idx >= n, period - idx, idx)
        elif mode == "wrap":
            idx = pos % n
        else:
            raise unsupported(node, f"mode {mode}")
        y = y.index_select(a, torch.from_numpy(idx.astype(np.int64)).to(y.device))
    return y


def _reduce(node, inputs, ctx):
    x = inputs[0]
    op = node.op
    rank = x.dim()
    keep = bool(int(node.attrs.get("keepdims", 1)))
    if op in ("ArgMax", "ArgMin"):
        axis = int(node.attrs.get("axis", 0)) % rank
        fn = torch.argmax if op == "ArgMax" else torch.argmin
        if int(node.attrs.get("select_last_index", 0)):
            idx = x.shape[axis] - 1 - fn(x.flip(axis), dim=axis, keepdim=keep)
        else:
            idx = fn(x, dim=axis, keepdim=keep)
        return idx.to(torch.int64)
    if "axes" in node.attrs:
        axes = [int(a) % rank for a in node.attrs["axes"]]
    else:
        ax_t = present(inputs, 1)
        axes = [a % rank for a in int_list(ax_t)] if ax_t is not None else []
    if not axes:
        if int(node.attrs.get("noop_with_empty_axes", 0)):  # no reduction; the map still applies
            return _NOOP_REDUCE.get(op, lambda t: t)(x)
        axes = list(range(rank))
    axes = sorted(set(axes))
    dims = tuple(axes)
    if op == "ReduceMean":
        return x.mean(dim=dims, keepdim=keep) if x.is_floating_point() else \
            torch.div(x.sum(dim=dims, keepdim=keep), int(math.prod(x.shape[a] for a in axes)), rounding_mode="trunc")
    if op == "ReduceSum":
        return x.sum(dim=dims, keepdim=keep, dtype=x.dtype)
    if op == "ReduceMax":
        return x.amax(dim=dims, keepdim=keep)
    if op == "ReduceMin":
        return x.amin(dim=dims, keepdim=keep)
    if op == "ReduceProd":
        y = x
        for a in reversed(axes):
            y = y.prod(dim=a, keepdim=keep, dtype=x.dtype)
        return y
    if op == "ReduceL1":
        return x.abs().sum(dim=dims, keepdim=keep, dtype=x.dtype)
    if op == "ReduceL2":
        if x.is_floating_point():
            return torch.linalg.vector_norm(x, ord=2, dim=dims, keepdim=keep)
        return (x * x).sum(dim=dims, keepdim=keep).double().sqrt().to(x.dtype)
    if op == "ReduceSumSquare":
        return (x * x).sum(dim=dims, keepdim=keep, dtype=x.dtype)
    if op == "ReduceLogSum":
        return x.sum(dim=dims, keepdim=keep).log()
    if op == "ReduceLogSumExp":
        return torch.logsumexp(x, dim=dims, keepdim=keep)
    raise unsupported(node, op)


_NOOP_REDUCE = {
    "ReduceL1": lambda t: t.abs(),
    "ReduceL2": lambda t: t.abs(),
    "ReduceSumSquare": lambda t: t * t,
    "ReduceLogSum": lambda t: t.log(),
}


def _softmax_like(op: str, x, dim: int):
    if op == "Softmax":
        return torch.softmax(x, dim)
    if op == "LogSoftmax":
        return torch.log_softmax(x, dim)
    idx = x.argmax(dim=dim, keepdim=True)  # Hardmax: first maximum
    return torch.zeros_like(x).scatter_(dim, idx, 1)
