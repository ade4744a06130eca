"""Recovery after pruning: bias compensation, BN re-calibration, fine-tuning.

- :mod:`onnxprune.recover.bias`: fold the mean activation of removed channels into the
  consumers' biases (:func:`compensate_bias`).
- :mod:`onnxprune.recover.bn`: re-estimate BatchNormalization statistics on calibration
  data without training (:func:`recalibrate_bn`).
- :mod:`onnxprune.recover.training`: train the weights in torch by distillation from the
  original model or cross-entropy on labels, write them back (:func:`finetune`).

:func:`recover` chains them in that order for the compress pipeline: compensation needs
the original model and the plan, re-calibration then measures the statistics of the
compensated model, and fine-tuning starts from (and keeps, BN in inference mode) the
re-estimated statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxprune.analysis.groups import Analysis
from onnxprune.data import CalibrationData
from onnxprune.recover.bias import (BiasCompensation, activation_means, activation_moments, compensate_bias,
                                    removed_sites)
from onnxprune.recover.bn import BNRecalibration, recalibrate_bn
from onnxprune.recover.training import FinetuneOptions, FinetuneResult, check_teacher, finetune, trainable_initializers

__all__ = ["BNRecalibration", "BiasCompensation", "FinetuneOptions", "FinetuneResult", "RecoveryResult",
           "activation_means", "activation_moments", "check_teacher", "compensate_bias", "finetune", "recalibrate_bn", "recover",
           "removed_sites", "trainable_initializers"]


@dataclass(frozen=True)
class RecoveryResult:
    """Outcome of :func:`recover`: the recovered model and what each step did.

    ``info`` is JSON-ready: ``{"bias_compensation": {...}, "bn_recalibration": {...},
    "finetune": {...}}`` with only the steps that ran.
    """

    model: onnx.ModelProto
    bias: BiasCompensation | None = None
    bn: BNRecalibration | None = None
    finetune: FinetuneResult | None = None
    info: Mapping[str, Any] = field(default_factory=dict)


def recover(original: onnx.ModelProto, pruned: onnx.ModelProto, analysis: Analysis,
            removed: Mapping[int, np.ndarray], data: CalibrationData, *, recalibrate: bool = False,
            finetune_options: FinetuneOptions | None = None, batch_size: int = 32,
            device: str = "auto", teacher: onnx.ModelProto | None = None,
            validate: Callable[[onnx.ModelProto], float] | None = None) -> RecoveryResult:
    """Bias compensation and BN re-calibration (``recalibrate``), then fine-tuning.

    Args:
        original: the canonical model that was pruned (teacher; analysis computed on it).
        pruned: ``apply_plan(original, analysis, removed)``.
        analysis / removed: the analysis and the plan's ``{group id: removed indices}``.
        data: calibration data (float32 [N, ...], optional labels).
        recalibrate: run bias compensation and BN re-calibration.
        finetune_options: fine-tune with these options (None: no fine-tuning).
        batch_size / device: of the compensation and re-calibration passes.
        teacher: the distillation target of fine-tuning (default ``original``; in
            progressive compression the unpruned model, while ``original`` is the
            previous step's model).
        validate: held-out score of a candidate (higher is better): the compensated and
            re-calibrated model is kept only when it scores at least as well as the plain
            cut (re-calibrating on data far from the training domain can hurt), and it drives
            fine-tuning's early stopping (:func:`onnxprune.recover.training.finetune`).

    Raises:
        OnnxPruneError subclasses from the steps (see each function).
    """
    from onnxprune.executor.device import resolve_device

    model, info = pruned, {}
    bias = bn = ft = None
    if recalibrate:
        dev = resolve_device(device)
        sites = removed_sites(original, analysis, removed)
        moments = activation_moments(original, sites, data, batch_size=batch_size, device=dev)
        bias = compensate_bias(model, original, analysis, removed, {k: m for k, (m, _) in moments.items()},
                               {k: sd for k, (_, sd) in moments.items()})
        model = bias.model
        info["bias_compensation"] = bias.to_dict()
        bn = recalibrate_bn(model, data, batch_size=batch_size, device=dev)
        info["bn_recalibration"] = bn.to_dict()
        if validate is not None:  # re-calibration on data far from the training domain can hurt
            before, after = float(validate(pruned)), float(validate(bn.model))
            info["bn_recalibration"]["held_out"] = {"before": before, "after": after, "kept": after >= before}
            model = bn.model if after >= before else pruned
        else:
            model = bn.model
    if finetune_options is not None:
        ft = finetune(model, data, teacher=original if teacher is None else teacher, options=finetune_options,
                      measure_loss=False, validate=validate)
        model = ft.model
        info["finetune"] = ft.to_dict()
    return RecoveryResult(model, bias, bn, ft, info)
