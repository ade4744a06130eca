"""Every data-parallel stage on small models, computed alike by one process and by each
rank of a multi-process run (tests/test_distributed.py compares the two).

:func:`run_cases` returns ``{case name: float64 array}``; run as a script under
``python -m torch.distributed.run --nproc-per-node 2 tests/distributed_cases.py OUT``
each rank computes the same cases inside :func:`onnxprune.distributed.session` (gloo)
and writes ``OUT/rank<r>.npz``.

Sizes are chosen so that the batches do not divide evenly among 2 ranks: 100 scoring
samples in batches of 32 (4 batches, the last one 4 samples), fine-tuning steps of 7
samples (a 4 / 3 split) and, on a model with a fixed batch of 1 (micro-batches), a last
step of 1 sample (rank 1's part is empty).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import build_chain  # noqa: E402


def _mnist():
    from onnxprune.data import load_calibration
    from onnxprune.pipeline import prepare

    prep = prepare(ROOT / "models" / "mnist_cnn.onnx")
    return prep.model, prep.analysis, load_calibration(ROOT / "models" / "mnist_cnn_samples.npz")


def _flat(scores) -> np.ndarray:
    return np.concatenate([np.asarray(scores[g], dtype=np.float64) for g in sorted(scores)])


def _weights(model: onnx.ModelProto) -> np.ndarray:
    return np.concatenate([numpy_helper.to_array(t).astype(np.float64).ravel() for t in model.graph.initializer
                           if numpy_helper.to_array(t).dtype.kind == "f"])


def _perturbed(model: onnx.ModelProto, scale: float = 0.05, seed: int = 1) -> onnx.ModelProto:
    """A copy with every float initializer of rank >= 1 jittered (a student that differs from its teacher)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype.kind == "f" and a.ndim >= 1 and "running" not in t.name and "mean" not in t.name \
                and "var" not in t.name:
            t.CopyFrom(numpy_helper.from_array((a * (1 + scale * rng.standard_normal(a.shape))).astype(a.dtype),
                                               t.name))
    return out


def run_cases() -> dict[str, np.ndarray]:
    """Every case's result (the same arrays on every rank of a multi-process run)."""
    from onnxprune.criteria.ifso import IFSO
    from onnxprune.criteria.infcp import InfCP
    from onnxprune.criteria.taylor import Taylor
    from onnxprune.data import from_arrays
    from onnxprune.recover import FinetuneOptions, activation_moments, finetune, recalibrate_bn, removed_sites
    from onnxprune.surgery import apply_plan

    model, a, data = _mnist()
    score_data = data.take(np.arange(100))
    out: dict[str, np.ndarray] = {}
    out["taylor_ce"] = _flat(Taylor(batch_size=32).score_with_data(a, model, score_data))
    out["taylor_kl"] = _flat(Taylor(batch_size=32).score_with_data(a, model, score_data.without_labels()))
    ifso = IFSO(batch_size=32).score_with_data(a, model, score_data)
    out["ifso"] = _flat(ifso)
    out["ifso_batches"] = np.array([ifso.info["batches"], ifso.info["mean_norm_H_wm_1"]])
    infcp = InfCP(members=3, finetune_steps=2, batch_size=16).score_with_data(a, model, data.take(np.arange(60)))
    out["infcp"] = _flat(infcp)
    out["infcp_spread"] = np.array([infcp.info["member_rank_correlation"], infcp.info["member_cv"]])

    removed = {g.id: np.arange(0, g.size, 3) for g in a.groups if g.prunable}
    pruned = apply_plan(model, a, removed)
    bn = recalibrate_bn(pruned, data.take(np.arange(90)), batch_size=16)
    out["bn"] = _weights(bn.model)
    out["bn_samples"] = np.array([bn.samples], dtype=np.float64)
    moments = activation_moments(model, removed_sites(model, a, removed), data.take(np.arange(90)), batch_size=16)
    out["bias_moments"] = np.concatenate([np.concatenate([m, sd]) for _, (m, sd) in sorted(moments.items())])

    opts = dict(epochs=2, lr=1e-3, batch_size=7, device="cpu", seed=3, warmup=0.0)
    ce = finetune(pruned, data.take(np.arange(45)), options=FinetuneOptions(optimizer="sgd", **opts))
    out["finetune_ce"] = _weights(ce.model)
    out["finetune_ce_losses"] = np.array([ce.loss_before, ce.loss_after, *ce.epoch_losses])
    kl = finetune(_perturbed(pruned), data.take(np.arange(45)).without_labels(), teacher=model,
                  options=FinetuneOptions(**opts))
    out["finetune_kl"] = _weights(kl.model)
    teacher = build_chain()
    x = np.random.default_rng(0).standard_normal((9, 3, 16, 16)).astype(np.float32)
    mse = finetune(_perturbed(teacher, 0.2), from_arrays(x), teacher=teacher,
                   options=FinetuneOptions(**dict(opts, batch_size=4)))  # fixed batch 1; last step: 1 sample
    out["finetune_mse"] = _weights(mse.model)
    out["finetune_mse_losses"] = np.array([mse.loss_before, mse.loss_after, *mse.epoch_losses])
    return out


if __name__ == "__main__":
    import torch

    from onnxprune.distributed import session

    torch.set_num_threads(1)
    with session("cpu") as ctx:
        results = run_cases()
        np.savez(Path(sys.argv[1]) / f"rank{ctx.rank}.npz", world=np.array(ctx.world), **results)
