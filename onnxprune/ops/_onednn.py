"""Matrix products of the executor on oneDNN (CPU, float32), with a plain fallback.

torch's ``@`` / ``addmm`` on the CPU call MKL's GEMM, which takes a generic code path on
non-Intel CPUs; oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the kernel
torch's own compiled CPU graphs use) does not. Measured on this project's AMD EPYC
(AVX-512), one thread: LeNet's 256x3136 @ 3136x200 takes 3.3 ms with MKL, 1.4 ms with
oneDNN; ResNet-50's 1x1 convolutions as GEMMs about 2x likewise. Results agree to float32
rounding (the same sums in another order).

- :func:`mm` is ``a @ b`` (2-D), on oneDNN outside autograd recording (a plain ``@`` where
  a graph is being recorded: double backward stays exact and differentiable);
- :func:`linear` is ``F.linear(x, w, b)`` for a 2-D ``x``: forward on oneDNN (with or
  without grad: the values do not depend on whether a gradient is recorded), backward
  with :func:`mm`.

Where the op is missing or refuses its arguments (a torch without oneDNN, another
device or dtype) everything falls back to the plain torch call, once and for good.
"""

from __future__ import annotations

from typing import Any

from onnxprune.ops._torch import F, torch

_OK: bool | None = None
_FUNCTION: Any = None


def available() -> bool:
    """Whether oneDNN's matmul can be called (tried once)."""
    global _OK
    if _OK is None:
        try:
            a = torch.ones(2, 3)
            _OK = bool(torch.backends.mkldnn.is_available()) and torch.equal(
                torch.ops.mkldnn._linear_pointwise(a, torch.ones(4, 3), None, "none", [], ""), torch.full((2, 4), 3.0))
        except (AttributeError, RuntimeError, NotImplementedError):
            _OK = False
    return _OK


def _fits(*ts) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 2 and t.numel() > 0
               for t in ts) and available()


def _linear_raw(x, w, b):
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def mm(a, b):
    """``a @ b`` for 2-D ``a`` [M, K] and ``b`` [K, N] (module doc)."""
    if torch.is_grad_enabled() or not _fits(a, b):
        return a @ b
    return _linear_raw(a, b.t(), None)


def linear(x, w, b=None):
    """``F.linear(x, w, b)``: ``x`` [M, K], ``w`` [N, K], ``b`` [N] or None (module doc)."""
    if not _fits(x, w) or (b is not None and (b.dtype != torch.float32 or b.dim() != 1)):
        return F.linear(x, w, b)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return _function().apply(x, w, b)
    return _linear_raw(x, w, b)


def _function():
    global _FUNCTION
    if _FUNCTION is None:

        class Linear(torch.autograd.Function):
            """F.linear with oneDNN's forward and :func:`mm` in the backward."""

            @staticmethod
            def forward(ctx, x, w, b):
                ctx.save_for_backward(x, w)
                return _linear_raw(x, w, b)

            @staticmethod
            def backward(ctx, go):
                x, w = ctx.saved_tensors
                need_x, need_w, need_b = ctx.needs_input_grad
                gx = mm(go, w) if need_x else None
                gw = mm(go.t(), x) if need_w else None
                gb = go.sum(0) if need_b else None
                return gx, gw, gb

        _FUNCTION = Linear
    return _FUNCTION
