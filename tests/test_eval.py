"""Evaluation (onnxprune.evaluate) and ``onnxprune eval``.

Hand-made models whose predictions are known: ``y = x @ W`` with W = I (the model) and
W = diag(1, 1, 1, 2) (the reference) on five 4-feature samples, so accuracy, agreement and
every fidelity figure can be counted by hand. The same figures with a fixed batch of 1
(run sample by sample), and with partial batches. CLI: table, JSON report, exit codes.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from onnxprune.data import from_arrays
from onnxprune.errors import DataError
from onnxprune.evaluate import evaluate

X = np.array([[3, 0, 0, 0],     # label 0: model 0 (right), reference 0 (right)
              [0, 2, 0, 1.5],   # label 3: model 1 (wrong), reference 3 (right): disagree
              [0, 0, 1, 0],     # label 2: both right
              [1, 0, 0, 0],     # label 1: both wrong (0)
              [0, 0, 0, 1]],    # label 3: both right
             dtype=np.float32)
Y = np.array([0, 3, 2, 1, 3])


def linear(diag, batch="N") -> onnx.ModelProto:
    w = numpy_helper.from_array(np.diag(np.asarray(diag, dtype=np.float32)), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "lin",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


MODEL, REF = linear([1, 1, 1, 1]), linear([1, 1, 1, 2])


@pytest.mark.parametrize("batch_dim, batch_size", [("N", 32), ("N", 2), (1, 32)])
def test_figures_match_the_hand_count(batch_dim, batch_size):
    res = evaluate(linear([1, 1, 1, 1], batch_dim), from_arrays(X, Y), reference=linear([1, 1, 1, 2], batch_dim),
                   batch_size=batch_size)
    assert res.samples == 5
    assert res.accuracy == pytest.approx(3 / 5)
    assert res.reference_accuracy == pytest.approx(4 / 5)
    assert res.agreement == pytest.approx(4 / 5)
    assert res.top5 is None  # 4 classes
    m = res.outputs["y"]
    assert m.max_abs_error == pytest.approx(1.5)          # sample 1, class 3: 1.5 vs 3
    assert m.max_rel_error == pytest.approx(1.5 / 3)      # max |ref| = 3
    assert m.rel_l2_error == pytest.approx(math.sqrt((1.5 ** 2 + 1) / 28))
    assert m.cosine == pytest.approx(21.5 / math.sqrt(18.25 * 28))
    assert m.top1_agreement == pytest.approx(4 / 5)


def test_without_labels_or_reference():
    res = evaluate(MODEL, from_arrays(X))
    assert res.accuracy is None and res.agreement is None and res.outputs == {}
    assert any("no labels" in n for n in res.notes)
    same = evaluate(MODEL, from_arrays(X, Y), reference=MODEL)
    assert same.agreement == 1.0 and same.outputs["y"].max_abs_error == 0.0 and same.outputs["y"].cosine == 1.0


def test_labels_out_of_range_are_a_data_error():
    with pytest.raises(DataError, match="4 classes"):
        evaluate(MODEL, from_arrays(X, np.array([0, 1, 2, 3, 4])))


def test_top5_with_enough_classes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    y = rng.integers(0, 8, 50)
    w = numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "lin",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    res = evaluate(model, from_arrays(x, y), batch_size=7)
    top5 = np.argsort(-x, axis=1)[:, :5]
    assert res.accuracy == pytest.approx(np.mean(x.argmax(1) == y))
    assert res.top5 == pytest.approx(np.mean((top5 == y[:, None]).any(1)))


def test_cli_eval_table_and_report(tmp_path):
    onnx.save(MODEL, tmp_path / "m.onnx")
    onnx.save(REF, tmp_path / "r.onnx")
    np.savez(tmp_path / "d.npz", x=X, y=Y)
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"),
                                  "--reference", str(tmp_path / "r.onnx"), "--report", str(tmp_path / "e.json"),
                                  "--batch-size", "2"])
    assert r.exit_code == 0, r.output
    assert "60.00%" in r.output and "80.00%" in r.output
    rep = json.loads((tmp_path / "e.json").read_text())
    assert rep["accuracy"] == pytest.approx(0.6) and rep["agreement"] == pytest.approx(0.8)
    assert rep["outputs"]["y"]["max_abs_error"] == pytest.approx(1.5)


def test_cli_eval_errors(tmp_path):
    onnx.save(MODEL, tmp_path / "m.onnx")
    wide = linear([1, 1, 1, 1])
    wide.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 5
    onnx.save(wide, tmp_path / "wide.onnx")
    np.savez(tmp_path / "d.npz", x=X, y=Y)
    runner = CliRunner()
    r = runner.invoke(main, ["eval", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2 and r.output.startswith("error: eval needs --data")
    r = runner.invoke(main, ["eval", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"),
                             "--reference", str(tmp_path / "wide.onnx")])
    assert r.exit_code == 2 and "--reference" in r.output and "input 'x' has shape [?, 5]" in r.output
    r = runner.invoke(main, ["eval", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "missing.npz")])
    assert r.exit_code == 2 and "missing.npz: no such file" in r.output
    r = runner.invoke(main, ["eval", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"),
                             "--report", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2 and "report/plan path must differ" in r.output
