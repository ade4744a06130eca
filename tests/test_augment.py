"""Consistent augmentation: shapes, dtypes, seeding, and the teacher seeing the student's view."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import onnxprune.recover.training as training
from onnxprune.data import CalibrationData
from onnxprune.errors import OnnxPruneError
from onnxprune.recover.augment import AUGMENT_KINDS, Augmenter, parse_augment
from onnxprune.recover.training import FinetuneOptions, finetune
from tiny_models import build_const_channel


def _x(n=6, c=3, h=12, w=16, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32))


@pytest.mark.parametrize("kind", AUGMENT_KINDS)
def test_each_kind_keeps_shape_dtype_and_is_seeded(kind):
    x = _x()
    aug = Augmenter((kind,))
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_shift_moves_content_by_whole_pixels():
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 8, 8] = 1.0
    out = Augmenter(("shift",), shift=0.25)(x, torch.Generator().manual_seed(0))
    assert out.sum() == 1.0 and out.max() == 1.0  # the bright pixel moved, nothing was blurred


def test_mixup_is_a_convex_combination_of_two_samples():
    x = torch.stack([torch.full((1, 4, 4), float(i)) for i in range(4)])
    out = Augmenter(("mixup",))(x, torch.Generator().manual_seed(1))
    assert torch.all(out >= 0) and torch.all(out <= 3)
    assert torch.allclose(out.mean(), x.mean())  # a permutation mix keeps the batch mean


def test_mixing_is_skipped_with_hard_labels_and_spatial_kinds_on_flat_inputs():
    x = _x()
    assert torch.equal(Augmenter(("mixup", "cutmix"), allow_mixing=False)(x, torch.Generator()), x)
    flat = torch.randn(5, 10)
    assert torch.equal(Augmenter(("shift", "crop", "flip", "cutmix"))(flat, torch.Generator()), flat)


def test_parse_augment():
    assert parse_augment("auto", classifier=True) == ("shift", "mixup")
    assert parse_augment("auto", classifier=False) == ("shift", "noise")
    assert parse_augment("none", classifier=True) == ()
    assert parse_augment("crop,noise,crop", classifier=True) == ("crop", "noise")
    with pytest.raises(OnnxPruneError, match="unknown --augment kind.*rotate"):
        parse_augment("crop,rotate", classifier=True)
    with pytest.raises(OnnxPruneError, match="rotate"):
        FinetuneOptions(augment=("rotate",))


def test_teacher_and_student_see_the_same_augmented_view(monkeypatch):
    model = build_const_channel(seed=0)
    rng = np.random.default_rng(0)
    data = CalibrationData(rng.standard_normal((8, 3, 8, 8)).astype(np.float32), None)
    seen = []
    real = training.forward_fixed

    def spy(graph, x, fixed):
        seen.append(x)
        return real(graph, x, fixed)

    monkeypatch.setattr(training, "forward_fixed", spy)
    finetune(model, data, teacher=build_const_channel(seed=0),
             options=FinetuneOptions(epochs=1, batch_size=4, augment=("shift", "noise", "mixup"), loss="kl"),
             measure_loss=False)
    assert len(seen) == 4  # two steps, teacher then student each
    for teacher_x, student_x in zip(seen[0::2], seen[1::2]):
        assert teacher_x is student_x
    raw = {tuple(np.round(v, 5)) for v in data.x.reshape(8, -1)[:, :5].tolist()}
    got = {tuple(np.round(v, 5)) for v in torch.cat(seen[1::2]).reshape(8, -1)[:, :5].tolist()}
    assert not got & raw  # the views are augmented, not the raw samples
