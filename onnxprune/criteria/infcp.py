"""``infcp``: channel influence on an ensemble of briefly fine-tuned copies.

Lai, Xiang, Shen, "Inf-CP: A Reliable Channel Pruning based on Channel Influence",
arXiv 2112.02521 (2021). The paper scores a weight by its *influence*: the first-order
Taylor term of the influence function of the weights, i.e. the loss change when the
weight is removed, ``-w * dL/dw``. A channel owns a set of weights (every member slice of
its group: producer filters and biases, BN gamma and beta, consumer input slices,
per-channel constants), so removing channel c changes the loss by about

    -sum_{w in c} w * dL/dw  =  -dL/dalpha at alpha = 1

where ``alpha`` scales every weight c owns. The score is the magnitude
``|sum_{w in c} w * dL/dw|``. To make it *reliable* (the paper's point: one model and
one batch of data give an influence that depends on that data), it is computed on an
ensemble: the calibration data is split into K disjoint shards (a seeded permutation,
``np.array_split``), member k is a copy of the model briefly fine-tuned on shard k
(SGD with momentum, ``finetune_steps`` steps of ``batch_size`` samples; one pass over
the shard by default), and its influence is measured on the same shard with the
weights it ended with. The K member scores are averaged; their spread is the
reliability figure in ``Scores.info``:

- ``member_rank_correlation``: mean over pairs of members of the Spearman rank
  correlation of their scores within a group, averaged over prunable groups of at least
  3 channels weighted by channel count (1 = the members agree on every ranking);
- ``member_cv``: mean over channels of the coefficient of variation (population std /
  mean) of the members' scores (channels whose mean is 0 are left out).

Per member (``ce``) the influence is that of the shard's mean loss: ``sum_w w * g``
with ``g`` the gradient of the mean loss over the shard, accumulated batch by batch
(batches weigh by their size), then the absolute value. So ``batch_size`` only
bounds memory; the influence does not depend on it (fine-tuning does: it takes one
SGD step per batch; and the sampled teacher losses below take |.| per batch). The original model is never modified: members are copies, built
one at a time (memory: one copy, one teacher and one batch's activations).

Which loss, and what fine-tuning means without labels
-----------------------------------------------------
The loss is resolved as for every data-driven criterion
(:func:`~onnxprune.criteria.loss.resolve_loss`: ``ce`` with labels; without labels
``kl`` for classifiers and ``mse`` otherwise). Then:

- ``ce`` (labels; or, asked for explicitly without labels, the original model's argmax
  as pseudo-labels): members are fine-tuned on the cross-entropy of their shard, and
  the influence is the gradient of the same cross-entropy at the fine-tuned weights.
  This is the paper's setting.
- ``kl`` / ``mse`` (the teacher losses, the defaults without labels): they are at their
  minimum where a copy *is* the original, so fine-tuning on them does not move a copy
  (the gradient is exactly 0 there) and their first-order influence is 0 for every
  channel. At a copy fine-tuned on something else their gradient is about
  F (theta_k - theta_0): it measures how far the copy moved, not what a channel is
  worth, and vanishes without fine-tuning. So for these losses fine-tuning is
  *skipped* (``info["finetune_steps"] = 0``; members differ by their shards and their
  draws) and the gradient comes from
  :meth:`~onnxprune.criteria.loss.Loss.fisher_sample`, as in ``taylor``: labels drawn
  from the original's softmax (``kl``), random projections of the outputs (``mse``).
  Its expectation is zero (E_y~p[grad log p(y)] = 0), so the sign of ``sum w * g`` is
  noise and its magnitude tracks the Fisher (Gauss-Newton) quadratic form of the
  channel's weights, i.e. the teacher loss's second-order change when the channel is
  scaled; to tame the draw's noise, ``|sum w * g|`` is taken per batch (independent
  draws) and averaged over the shard's batches, weighted by their size.
  Tried and rejected for unlabelled classifiers: fine-tuning and measuring on
  cross-entropy against the original's argmax (the KL's hard-label limit; still
  available as ``loss="ce"`` without labels). On LeNet5 / MNIST at 20% of the MACs,
  3 seeds, 512 unlabelled samples, it kept 42.5 / 63.2 / 65.7% test accuracy against
  75.5 / 80.8 / 72.9% for the sampled-label version (the copies grow more confident
  on their shards and the self-label gradient fades).

Weights: every float member of the group counts except BatchNormalization's running
mean and variance (statistics: zeroing them is not what removing the channel does, and
``w * dL/dw`` of a variance is not a removal term). Fine-tuning trains exactly the
weights recovery trains (:func:`onnxprune.recover.training.trainable_initializers`):
never those statistics, Resize scales, Pad values, Clip bounds or shape constants.

Multi-process runs (:mod:`onnxprune.distributed`): the ensemble is split by member, not
by sample: rank r builds, fine-tunes and measures the members ``k = r, r + world, ...``
(each on its own shard, with its own seeds, exactly as one process does), and the member
scores are all-reduced, so every rank gets the K members of a one-process run and the same
mean and spread. With more ranks than members the extra ranks idle.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from onnxprune.analysis.groups import Analysis
from onnxprune.criteria.base import Scores
from onnxprune.batching import fixed_batch
from onnxprune.criteria.calibration import calibration_batches, scoring_setup
from onnxprune.criteria.loss import Loss
from onnxprune.data import CalibrationData
from onnxprune.distributed import current
from onnxprune.errors import OnnxPruneError
from onnxprune.executor.graph_module import TorchGraph
from onnxprune.recover.training import trainable_initializers


def ensemble_shards(n: int, members: int, seed: int = 0) -> list[np.ndarray]:
    """Disjoint shards of ``range(n)`` that together cover it, one per member.

    A seeded random permutation split into ``members`` near-equal parts (sizes differ by
    at most one); each shard's indices are sorted.

    Returns:
        ``members`` int64 arrays.

    Raises:
        OnnxPruneError: ``members < 1`` or fewer samples than members.
    """
    if members < 1:
        raise OnnxPruneError(f"infcp needs at least 1 ensemble member, got {members}")
    if n < members:
        raise OnnxPruneError(f"infcp with {members} ensemble members needs at least {members} calibration "
                             f"samples (one shard each), got {n}; lower --ensemble or give more data")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(s).astype(np.int64) for s in np.array_split(perm, members)]


def _average_ranks(v: np.ndarray) -> np.ndarray:
    """1-based ranks of ``v``, ties get their average rank (as Spearman's rho needs)."""
    _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inv]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two float vectors of equal length (nan if either is constant)."""
    ra, rb = _average_ranks(np.asarray(a)), _average_ranks(np.asarray(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def ensemble_spread(member_scores: list[Mapping[int, np.ndarray]]) -> dict[str, float]:
    """Reliability figures of K members' scores ``[{group id: float64 [size]}]`` (K >= 2).

    Returns:
        ``member_rank_correlation`` (mean pairwise Spearman within groups of >= 3
        channels, channel-weighted over groups) and ``member_cv`` (mean over channels
        with nonzero mean of std / mean across members); each None (JSON null) when no
        group or channel qualifies.
    """
    k = len(member_scores)
    corr_sum = corr_w = 0.0
    cvs = []
    for gid in member_scores[0]:
        s = np.stack([m[gid] for m in member_scores])  # [K, size]
        mean = s.mean(axis=0)
        nz = mean > 0
        cvs.append(s.std(axis=0)[nz] / mean[nz])
        if s.shape[1] < 3:
            continue
        rhos = [spearman(s[i], s[j]) for i in range(k) for j in range(i + 1, k)]
        rhos = [r for r in rhos if not math.isnan(r)]
        if rhos:
            corr_sum += s.shape[1] * float(np.mean(rhos))
            corr_w += s.shape[1]
    cv = np.concatenate(cvs) if cvs else np.zeros(0)
    return {"member_rank_correlation": corr_sum / corr_w if corr_w else None,
            "member_cv": float(cv.mean()) if cv.size else None}


def _bn_statistics(graph: TorchGraph) -> set[str]:
    """Names of the running mean / variance inputs of every BatchNormalization."""
    out = set()
    for _, op, _, inputs in graph.nodes():
        if op == "BatchNormalization":
            out.update(t for t in inputs[3:5] if t)
    return out


class _ChannelReducer:
    """Sums ``w * g`` of every member slice into per-channel totals, on the device.

    ``reduce(prod)`` takes ``{param name: w * g}`` (tensors shaped like the parameters)
    and returns float64 [sum of prunable group sizes] (group g at ``offsets[g]``).
    """

    def __init__(self, analysis: Analysis, names: set[str], device) -> None:
        self.groups = [g for g in analysis.groups if g.prunable]
        self.offsets = np.cumsum([0] + [g.size for g in self.groups]).astype(np.int64)
        self.total = int(self.offsets[-1])
        self.items = []  # (param name, rows, axis, positions, target indices)
        for off, g in zip(self.offsets, self.groups):
            for m in g.members:
                if m.tensor not in names:
                    continue
                self.items.append((m.tensor, m.rows, m.axis,
                                   torch.as_tensor(m.positions, dtype=torch.long, device=device),
                                   torch.as_tensor(off + m.channels, dtype=torch.long, device=device)))
        self.device = device

    @property
    def tensors(self) -> list[str]:
        return list(dict.fromkeys(t for t, *_ in self.items))

    def reduce(self, prod: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(self.total, dtype=torch.float64, device=self.device)
        for name, rows, axis, pos, idx in self.items:
            p = prod.get(name)
            if p is None:
                continue
            if rows is not None:
                p = p[rows[0]:rows[1]]
            p = p.movedim(axis, 0).index_select(0, pos).reshape(len(pos), -1)
            out.index_add_(0, idx, p.sum(dim=1, dtype=torch.float64))
        return out

    def split(self, flat: np.ndarray) -> dict[int, np.ndarray]:
        return {g.id: flat[o:o + g.size].copy() for o, g in zip(self.offsets, self.groups)}


@dataclass(frozen=True)
class InfCP:
    """Channel influence |sum_{w in c} w dL/dw| averaged over K fine-tuned copies (Inf-CP).

    Lai, Xiang, Shen, arXiv 2112.02521; see the module docstring for the loss without
    labels and for what is fine-tuned.

    Attributes:
        members: K, ensemble size (one disjoint shard of the calibration data each).
        finetune_steps: SGD steps per member; None = one pass over its shard
            (ceil(shard / batch_size) steps); 0 = no fine-tuning.
        lr / momentum: SGD settings of the fine-tuning.
        batch_size / device / seed: defaults of :meth:`score_with_data`; the seed fixes the
            shards, the order of fine-tuning batches and (``mse``) the sampled projections.
        loss: ``auto``, ``ce``, ``kl`` or ``mse`` (:mod:`onnxprune.criteria.loss`).
    """

    members: int = 4
    finetune_steps: int | None = None
    lr: float = 1e-3
    momentum: float = 0.9
    batch_size: int = 32
    device: str = "cpu"
    seed: int = 0
    loss: str = "auto"
    name: str = "infcp"
    normalize: bool = True
    requires_data: bool = True

    def score(self, analysis: Analysis, weights: Mapping[str, np.ndarray]) -> Scores:
        """Not usable without data: raises OnnxPruneError (use :meth:`score_with_data`)."""
        raise OnnxPruneError("criterion infcp needs calibration data (score_with_data with the model and data)")

    def score_with_data(self, analysis: Analysis, model: onnx.ModelProto, data: CalibrationData, *,
                        batch_size: int | None = None, device: str | torch.device | None = None,
                        seed: int | None = None, return_members: bool = False) -> Scores:
        """Score every prunable group's channels on ``data``.

        Args:
            analysis: analysis of ``model``.
            model: the canonical model (single graph input); not modified.
            data: calibration inputs (and optional labels), at least ``members`` samples.
            batch_size / device / seed: override the instance's settings.
            return_members: also put each member's scores in ``info["member_scores"]``
                (``[{group id: float64 [size]}]``, not JSON-ready: for tests and studies).

        Returns:
            ``Scores``: ``{group id: float64 [group.size] >= 0}`` for every prunable group
            (the mean over members); ``info`` holds ``members``, ``finetune_steps`` (per
            member), ``loss`` (what the gradient was taken of), ``shard_sizes`` and, for
            K >= 2, ``member_rank_correlation`` and ``member_cv`` (module docstring).

        Raises:
            OnnxPruneError: no data or fewer samples than members, bad settings, several
                graph inputs, or an output the loss cannot use (``ce``/``kl`` on a first
                output that is not [N, classes]); DistributedError: another rank failed
                (multi-process runs: every rank must call this and gets the same scores).
        """
        batch_size = self.batch_size if batch_size is None else batch_size
        device = self.device if device is None else device
        seed = self.seed if seed is None else seed
        if self.finetune_steps is not None and self.finetune_steps < 0:
            raise OnnxPruneError(f"infcp finetune_steps must be >= 0, got {self.finetune_steps}")
        if batch_size < 1:
            raise OnnxPruneError(f"batch size must be >= 1, got {batch_size}")
        teacher, resolved = scoring_setup("infcp", model, data, self.loss, device)
        shards = ensemble_shards(len(data), self.members, seed)
        sampled = resolved.uses_teacher  # kl / mse: no first-order signal, sampled targets
        loss_fn = resolved
        use_labels = resolved.kind == "ce" and data.y is not None
        # the original's outputs are needed for pseudo-labels and the teacher losses (kl, mse) only
        ref = None if use_labels else teacher
        frozen = _bn_statistics(teacher)
        trainable = set(trainable_initializers(model))  # the same weights recovery trains
        fixed = fixed_batch(model)
        reducer = _ChannelReducer(analysis, {n for n, _ in teacher.named_onnx_parameters()} - frozen, device)

        ctx = current()
        flat = np.zeros((len(shards), reducer.total), dtype=np.float64)  # member k's scores, row k
        steps_done = np.zeros(len(shards), dtype=np.int64)
        for k, idx in enumerate(shards):
            if k % ctx.world != ctx.rank:
                continue  # another rank's member
            shard = data.take(idx) if use_labels else data.take(idx).without_labels()
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + k)
            rng = np.random.default_rng([seed, k])
            member = copy.deepcopy(teacher)
            steps = 0 if sampled else self._finetune(member, ref, shard, loss_fn, trainable, batch_size, device, rng,
                                                                fixed)
            steps_done[k] = steps
            flat[k] = self._influence(member, ref, shard, loss_fn, reducer, batch_size, device, gen, sampled, fixed)
            del member
        flat, steps_done = ctx.all_reduce_sum(flat), ctx.all_reduce_sum(steps_done)
        members = [reducer.split(row) for row in flat]
        scores = {gid: np.mean([m[gid] for m in members], axis=0) for gid in members[0]}
        info: dict = {"members": len(members), "finetune_steps": int(max(steps_done)),
                      "loss": ("kl (labels sampled from the original's softmax; no fine-tuning)"
                               if resolved.kind == "kl" else
                               "mse (sampled Gauss-Newton projections; no fine-tuning)" if sampled else
                               "ce (labels)" if use_labels else "ce (pseudo-labels: the original's argmax)"),
                      "shard_sizes": [int(len(s)) for s in shards]}
        if len(members) >= 2:
            info.update(ensemble_spread(members))
        if return_members:
            info["member_scores"] = members
        return Scores(scores, info=info)

    # ---- the two phases of a member ---------------------------------------------------
    def _finetune(self, member: TorchGraph, teacher: TorchGraph | None, shard: CalibrationData, loss_fn: Loss,
                  trainable: set[str], batch_size: int, device, rng: np.random.Generator,
                  fixed: int | None = None) -> int:
        """A few SGD steps on ``shard`` (in place on ``member``) over the ``trainable``
        initializers (:func:`onnxprune.recover.training.trainable_initializers`); returns
        the step count."""
        per_epoch = math.ceil(len(shard) / batch_size)
        steps = per_epoch if self.finetune_steps is None else int(self.finetune_steps)
        if steps == 0:
            return 0
        params = []
        for name, p in member.named_onnx_parameters():
            train = name in trainable
            p.requires_grad_(train)
            if train:
                params.append(p)
        opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        done = 0
        while done < steps:
            order = rng.permutation(len(shard))
            shuffled = shard.take(order)
            for b in calibration_batches(shuffled, batch_size, device, teacher, fixed=fixed):
                if done == steps:
                    break
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(b.forward(member), b.y, b.reference)
                if not torch.isfinite(loss):
                    raise OnnxPruneError(f"infcp fine-tuning diverged (loss {float(loss)}); lower lr")
                loss.backward()
                opt.step()
                done += 1
        for p in params:
            p.requires_grad_(False)
        return done

    def _influence(self, member: TorchGraph, teacher: TorchGraph | None, shard: CalibrationData, loss_fn: Loss,
                   reducer: _ChannelReducer, batch_size: int, device, gen: torch.Generator,
                   sampled: bool, fixed: int | None = None) -> np.ndarray:
        """float64 [prunable channels]: |sum_w w dL/dw| on ``shard`` at the member's weights."""
        names = reducer.tensors
        params = [member.parameter(n) for n in names]
        for p in params:
            p.requires_grad_(True)
        n = len(shard)
        gsum = [None] * len(params)
        acc = torch.zeros(reducer.total, dtype=torch.float64, device=device)
        for b in calibration_batches(shard, batch_size, device, teacher, fixed=fixed):
            out = b.forward(member)
            if sampled:
                loss = loss_fn.fisher_sample(out, b.y, b.reference, generator=gen)
            else:
                loss = loss_fn(out, b.y, b.reference)
            grads = torch.autograd.grad(loss * (b.x.shape[0] / n), params, allow_unused=True)
            if sampled:  # per-batch |sum w g| of independent draws, size-weighted mean
                prod = {nm: p.detach() * g for nm, p, g in zip(names, params, grads) if g is not None}
                acc += reducer.reduce(prod).abs()
            else:
                for i, g in enumerate(grads):
                    if g is not None:
                        gsum[i] = g if gsum[i] is None else gsum[i] + g
        if not sampled:
            prod = {nm: p.detach() * g for nm, p, g in zip(names, params, gsum) if g is not None}
            acc = reducer.reduce(prod).abs()
        for p in params:
            p.requires_grad_(False)
        return acc.cpu().numpy()
