"""The losses of the data-driven criteria (onnxprune.criteria.loss).

- ``ce`` / ``kl`` / ``mse`` equal their textbook formulas; teacher losses are 0 with a
  zero gradient at the teacher;
- ``fisher_sample``'s squared gradient estimates the Hessian of the teacher loss at the
  teacher (exactly for ``kl``, half of it for ``mse``), checked by Monte Carlo against
  torch.autograd.functional.hessian;
- ``auto`` resolves by labels and output rank; bad input raises with a clear message.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from onnxprune.criteria.loss import Loss, make_loss, resolve_loss
from onnxprune.errors import OnnxPruneError

OUT = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])


def test_ce_labels_and_pseudo_labels():
    loss = make_loss("ce")
    assert torch.allclose(loss(OUT, torch.tensor([1, 1])), F.cross_entropy(OUT, torch.tensor([1, 1])))
    assert torch.allclose(loss(OUT), F.cross_entropy(OUT, torch.tensor([0, 2])))
    ref = torch.tensor([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0]])
    assert torch.allclose(loss([OUT], None, [ref]), F.cross_entropy(OUT, torch.tensor([1, 1])))
    with pytest.raises(OnnxPruneError, match="classifier"):
        loss(torch.zeros(1, 3, 4, 4))
    with pytest.raises(OnnxPruneError, match="labels outside"):
        loss(OUT, torch.tensor([0, 7]))
    with pytest.raises(OnnxPruneError, match="3 labels for a batch of 2"):
        loss(OUT, torch.tensor([0, 1, 2]))


def test_kl_formula_and_zero_at_teacher():
    ref = torch.tensor([[0.5, 0.1, 0.0], [1.0, -1.0, 0.0]])
    p, q = ref.softmax(1), OUT.softmax(1)
    want = (p * (p.log() - q.log())).sum(1).mean()
    assert torch.allclose(make_loss("kl")(OUT, None, ref), want, atol=1e-6)
    z = ref.clone().requires_grad_(True)
    val = make_loss("kl")(z, None, ref)
    (g,) = torch.autograd.grad(val, z)
    assert abs(float(val.detach())) < 1e-7 and float(g.abs().max()) < 1e-7
    with pytest.raises(OnnxPruneError, match="reference"):
        make_loss("kl")(OUT)


def test_mse_scaled_by_reference_variance_over_all_outputs():
    o1, r1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4) * 5
    o2, r2 = torch.randn(2, 7), torch.randn(2, 7)
    want = F.mse_loss(o1, r1) / r1.var(unbiased=False) + F.mse_loss(o2, r2) / r2.var(unbiased=False)
    got = make_loss("mse")((o1, o2, torch.zeros(2, dtype=torch.int64)), None, (r1, r2, torch.zeros(2, dtype=torch.int64)))
    assert torch.allclose(got, want, rtol=1e-5)
    with pytest.raises(OnnxPruneError, match="reference"):
        make_loss("mse")(o1)
    with pytest.raises(OnnxPruneError, match="differs from the reference"):
        make_loss("mse")(o1, None, r1[:, :2])


def _mc_outer(loss: Loss, z0: torch.Tensor, ref: torch.Tensor, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    acc = torch.zeros(z0.numel(), z0.numel(), dtype=torch.float64)
    for _ in range(n):
        z = z0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss.fisher_sample(z, None, ref, generator=gen), z)
        g = g.reshape(-1).double()
        acc += torch.outer(g, g)
    return acc / n


def test_fisher_sample_estimates_the_teacher_hessian():
    ref = torch.tensor([[1.0, 0.2, -0.5, 0.0]], dtype=torch.float64)
    kl = make_loss("kl")
    H = torch.autograd.functional.hessian(lambda z: kl(z, None, ref), ref.clone()).reshape(4, 4)
    est = _mc_outer(kl, ref.clone(), ref, 4000)
    assert float((est - H).abs().max()) < 0.05 * float(H.abs().max()), (est, H)

    ref2 = torch.randn(1, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mse = make_loss("mse")
    H2 = torch.autograd.functional.hessian(lambda z: mse(z, None, ref2), ref2.clone()).reshape(6, 6)
    est2 = _mc_outer(mse, ref2.clone(), ref2, 4000)
    assert float((2 * est2 - H2).abs().max()) < 0.1 * float(H2.abs().max())


def test_resolve_auto_and_errors():
    assert resolve_loss("auto", has_labels=True, first_output_rank=2).kind == "ce"
    assert resolve_loss("auto", has_labels=False, first_output_rank=2).kind == "kl"
    assert resolve_loss("auto", has_labels=False, first_output_rank=4).kind == "mse"
    # labels do not make a loss for a detector: auto falls back to the teacher loss
    assert resolve_loss("auto", has_labels=True, first_output_rank=4).kind == "mse"
    assert resolve_loss("distill", has_labels=True, first_output_rank=2).kind == "kl"
    assert resolve_loss("mse", has_labels=True, first_output_rank=2).kind == "mse"
    assert resolve_loss("kl", has_labels=False, first_output_rank=2).uses_teacher
    assert not resolve_loss("ce", has_labels=False, first_output_rank=2).uses_teacher
    with pytest.raises(OnnxPruneError, match="rank 4.*--loss mse"):
        resolve_loss("ce", has_labels=True, first_output_rank=4)
    with pytest.raises(OnnxPruneError, match="unknown loss 'hinge'"):
        resolve_loss("hinge", has_labels=True, first_output_rank=2)
    with pytest.raises(OnnxPruneError, match="unknown loss 'auto'"):
        make_loss("auto")


def test_prefer_teacher_resolves_auto_to_the_teacher_loss_even_with_labels():
    assert resolve_loss("auto", has_labels=True, first_output_rank=2, prefer_teacher=True).kind == "kl"
    assert resolve_loss("auto", has_labels=True, first_output_rank=3, prefer_teacher=True).kind == "mse"
    assert resolve_loss("ce", has_labels=True, first_output_rank=2, prefer_teacher=True).kind == "ce"


def test_kl_refuses_a_teacher_of_another_shape():
    with pytest.raises(OnnxPruneError, match=r"shape \(2, 3\).*teacher's\) has \(2, 4\)"):
        make_loss("kl")(OUT, None, torch.zeros(2, 4))
    with pytest.raises(OnnxPruneError, match="teacher"):
        make_loss("kl").fisher_sample(OUT, None, torch.zeros(2, 4))
