"""Consistent augmentation for distillation: the teacher labels the view the student sees.

Method: "Knowledge distillation: a good teacher is patient and consistent", Beyer et al.,
CVPR 2022 ("function matching"): student and teacher are evaluated on the *same*
augmented input, and aggressive mixing of inputs (mixup) keeps the targets informative.
:func:`onnxprune.recover.training.finetune` applies the augmenter to a batch before both
models see it; with hard labels (cross-entropy) the mixing kinds are skipped, since a
mixed input has no single label.

Kinds (``--augment`` takes a comma-separated list, ``auto`` or ``none``):

- ``shift``: each sample is translated by up to ``shift`` of its height and width
  (integer pixels, edge replication), independently per sample.
- ``crop``: random resized crop per sample: a box of 60-100 % of the area, aspect ratio
  3/4..4/3 (clipped to the image), bilinearly resized back to H x W.
- ``flip``: horizontal flip of half the samples (never a default: it changes the meaning
  of text, orientation and asymmetric detection inputs for the deployed model).
- ``noise``: Gaussian noise of ``noise`` times each sample's standard deviation.
- ``mixup``: ``lam * x + (1 - lam) * x[perm]`` with ``lam ~ Beta(alpha, alpha)`` per batch.
- ``cutmix``: a box of area ``1 - lam`` pasted from ``x[perm]``.

``auto``: ``shift,mixup`` for classifiers (first output [N, classes]), ``shift,noise``
for anything else (detectors, segmenters, OCR: geometry-preserving and mild). Only
spatial inputs [N, C, H, W] get the spatial kinds; other ranks get ``noise`` / ``mixup``
only. Every kind keeps the batch's shape and dtype and draws from the given generator
(seeded: the same seed gives the same views).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from onnxprune.errors import OnnxPruneError

__all__ = ["AUGMENT_KINDS", "Augmenter", "parse_augment"]

AUGMENT_KINDS = ("shift", "crop", "flip", "noise", "mixup", "cutmix")
_SPATIAL = ("shift", "crop", "flip", "cutmix")
_MIXING = ("mixup", "cutmix")


def parse_augment(spec: str | Sequence[str] | None, *, classifier: bool) -> tuple[str, ...]:
    """Kinds from ``--augment`` (``auto``, ``none``, or a comma-separated list).

    Raises:
        OnnxPruneError: an unknown kind, naming it and the known ones.
    """
    if spec is None:
        return ()
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    spec = list(spec)
    if spec in (["none"], []):
        return ()
    if spec == ["auto"]:
        return ("shift", "mixup") if classifier else ("shift", "noise")
    bad = [s for s in spec if s not in AUGMENT_KINDS]
    if bad:
        raise OnnxPruneError(f"unknown --augment kind(s) {', '.join(bad)}; choose from auto, none, "
                             f"{', '.join(AUGMENT_KINDS)}")
    return tuple(dict.fromkeys(spec))


@dataclass(frozen=True)
class Augmenter:
    """Applies the kinds in order to a batch (see the module docstring).

    Attributes:
        kinds: augmentation kinds, from :func:`parse_augment`.
        shift: largest translation, as a fraction of H and W.
        noise: noise standard deviation relative to each sample's.
        alpha: Beta(alpha, alpha) parameter of mixup / cutmix.
        allow_mixing: False with hard labels (mixup / cutmix are skipped).
    """

    kinds: tuple[str, ...]
    shift: float = 0.0625
    noise: float = 0.05
    alpha: float = 0.4
    allow_mixing: bool = True

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The augmented batch: same shape, dtype and device as ``x`` [N, ...]."""
        if not self.kinds or x.shape[0] == 0 or not x.is_floating_point():
            return x
        spatial = x.dim() == 4
        for kind in self.kinds:
            if kind in _SPATIAL and not spatial:
                continue
            if kind in _MIXING and (not self.allow_mixing or x.shape[0] < 2):
                continue
            x = getattr(self, f"_{kind}")(x, gen)
        return x

    # every draw is made on the CPU generator, then moved: the same on every device
    def _rand(self, gen: torch.Generator, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=gen)

    def _shift(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        dy_max, dx_max = int(round(self.shift * h)), int(round(self.shift * w))
        if dy_max == 0 and dx_max == 0:
            return x
        padded = F.pad(x, (dx_max, dx_max, dy_max, dy_max), mode="replicate")
        oy = torch.randint(0, 2 * dy_max + 1, (n,), generator=gen).tolist()
        ox = torch.randint(0, 2 * dx_max + 1, (n,), generator=gen).tolist()
        return torch.stack([padded[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(n)])

    def _crop(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        out = []
        for i in range(n):
            area, logr = self._rand(gen, 2).tolist()
            area = 0.6 + 0.4 * area
            ratio = math.exp(math.log(3 / 4) + logr * (math.log(4 / 3) - math.log(3 / 4)))
            ch = min(h, max(1, int(round(math.sqrt(area * h * w / ratio)))))
            cw = min(w, max(1, int(round(math.sqrt(area * h * w * ratio)))))
            y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            box = x[i:i + 1, :, y0:y0 + ch, x0:x0 + cw]
            out.append(F.interpolate(box, size=(h, w), mode="bilinear", align_corners=False))
        return torch.cat(out)

    def _flip(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        pick = (self._rand(gen, x.shape[0]) < 0.5).to(x.device)
        return torch.where(pick.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)

    def _noise(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        std = x.detach().flatten(1).std(dim=1).view(-1, *([1] * (x.dim() - 1)))
        eps = torch.randn(x.shape, generator=gen).to(device=x.device, dtype=x.dtype)
        return x + self.noise * std * eps

    def _lam(self, gen: torch.Generator) -> float:
        # Beta(a, a) from two Gamma draws made with the seeded generator
        a = torch.full((2,), float(self.alpha))
        g = torch._standard_gamma(a, generator=gen)
        return float(g[0] / g.sum())

    def _perm(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randperm(n, generator=gen)

    def _mixup(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        lam = self._lam(gen)
        perm = self._perm(x.shape[0], gen).to(x.device)
        return lam * x + (1.0 - lam) * x[perm]

    def _cutmix(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        lam = self._lam(gen)
        perm = self._perm(n, gen).to(x.device)
        ch, cw = int(round(h * math.sqrt(1 - lam))), int(round(w * math.sqrt(1 - lam)))
        if ch == 0 or cw == 0:
            return x
        y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        out = x.clone()
        out[:, :, y0:y0 + ch, x0:x0 + cw] = x[perm][:, :, y0:y0 + ch, x0:x0 + cw]
        return out
