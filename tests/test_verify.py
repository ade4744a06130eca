"""Tests of onnxprune.runtime.verify on tiny classifiers built here with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.runtime import verify as verify_mod
from onnxprune.errors import OnnxPruneError, VerificationError
from onnxprune.inputs import make_inputs
from onnxprune.runtime.verify import OutputFidelity, VerifyResult, run_model, verify

SHAPES = {"x": (2, 3, 8, 8)}


def classifier(
    channels: int = 4,
    classes: int = 10,
    *,
    seed: int = 0,
    weights: dict[str, np.ndarray] | None = None,
    in_channels_decl: int | str = 3,
    out_dtype: int | None = None,
) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(3->channels) -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> logits[N,classes]."""
    rng = np.random.default_rng(seed)
    w = weights or {
        "conv.weight": rng.standard_normal((channels, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(channels).astype(np.float32),
        "fc.weight": rng.standard_normal((classes, channels)).astype(np.float32),
        "fc.bias": rng.standard_normal(classes).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    out_name = "logits"
    elem = TensorProto.FLOAT
    if out_dtype is not None:
        nodes[-1].output[0] = "gemm_out"
        nodes.append(helper.make_node("Cast", ["gemm_out"], ["logits"], name="cast", to=out_dtype))
        elem = out_dtype
    n_classes = w["fc.weight"].shape[0]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_channels_decl, 8, 8])],
        [helper.make_tensor_value_info(out_name, elem, ["N", n_classes])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def weights_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}


def pruned_channels(model: onnx.ModelProto, keep: list[int]) -> onnx.ModelProto:
    """The classifier with only conv channels ``keep`` (a real channel pruning)."""
    w = weights_of(model)
    w = {
        "conv.weight": w["conv.weight"][keep],
        "conv.bias": w["conv.bias"][keep],
        "fc.weight": np.ascontiguousarray(w["fc.weight"][:, keep]),
        "fc.bias": w["fc.bias"],
    }
    return classifier(weights=w)


def test_same_model_is_exact():
    m = classifier()
    result = verify(m, m, SHAPES)
    assert isinstance(result, VerifyResult)
    assert result.output_shapes == {"logits": (2, 10)}
    fid = result.fidelity["logits"]
    assert fid.max_abs_error == 0.0
    assert fid.max_rel_error == 0.0
    assert fid.cosine == pytest.approx(1.0, abs=1e-12)
    assert fid.top1_agreement == 1.0


def test_pruned_model_passes_and_reports_difference():
    original = classifier(seed=1)
    pruned = pruned_channels(original, [0, 2])
    result = verify(pruned, original, SHAPES, seed=3)
    assert result.output_shapes == {"logits": (2, 10)}

    feeds = make_inputs(original, SHAPES, seed=3)
    ref = run_model(original, feeds)["logits"].astype(np.float64)
    out = run_model(pruned, feeds)["logits"].astype(np.float64)
    fid = result.fidelity["logits"]
    max_abs = np.abs(out - ref).max()
    assert max_abs > 0
    assert fid.max_abs_error == pytest.approx(max_abs)
    assert fid.max_rel_error == pytest.approx(max_abs / np.abs(ref).max())
    cos = ref.ravel() @ out.ravel() / (np.linalg.norm(ref) * np.linalg.norm(out))
    assert fid.cosine == pytest.approx(cos)
    agree = np.mean(ref.argmax(1) == out.argmax(1))
    assert fid.top1_agreement == pytest.approx(agree)

    d = result.to_dict()
    assert d["output_shapes"] == {"logits": [2, 10]}
    assert set(d["outputs"]["logits"]) == {"max_abs_error", "max_rel_error", "cosine", "top1_agreement"}


def test_all_zero_output_gives_zero_cosine():
    # all-zero pruned output against a nonzero reference: cosine 0, rel error 1
    original = classifier(seed=2)
    w = weights_of(original)
    w["fc.weight"][:] = 0
    w["fc.bias"][:] = 0
    zero = classifier(weights=w)
    fid = verify(zero, original, SHAPES).fidelity["logits"]
    assert fid.cosine == 0.0
    assert fid.max_rel_error == pytest.approx(1.0)


def test_output_shape_mismatch_names_output():
    original = classifier(classes=10)
    wrong = classifier(classes=9)
    with pytest.raises(VerificationError, match="'logits'.*shape"):
        verify(wrong, original, SHAPES)


def test_output_dtype_mismatch_names_output():
    original = classifier()
    as_double = classifier(out_dtype=TensorProto.DOUBLE)
    with pytest.raises(VerificationError, match="'logits'.*dtype"):
        verify(as_double, original, SHAPES)


def test_missing_output_is_named():
    original = classifier()
    renamed = classifier()
    renamed.graph.node[-1].output[0] = "scores"
    renamed.graph.output[0].name = "scores"
    with pytest.raises(VerificationError, match="lacks output 'logits'"):
        verify(renamed, original, SHAPES)


def test_checker_failure_is_verification_error():
    original = classifier()
    broken = classifier()
    broken.graph.node[1].input[0] = "no_such_tensor"
    with pytest.raises(VerificationError, match="checker.*'no_such_tensor'.*relu") as info:
        verify(broken, original, SHAPES)
    assert "\n" not in str(info.value)


def test_runtime_failure_names_node():
    # Conv weights read 5 input channels; the declared channel dim is symbolic, so the
    # checker cannot see it and onnxruntime fails when running node "conv".
    original = classifier()
    rng = np.random.default_rng(0)
    w = weights_of(original)
    w["conv.weight"] = rng.standard_normal((4, 5, 3, 3)).astype(np.float32)
    bad = classifier(weights=w, in_channels_decl="C")
    with pytest.raises(VerificationError, match="node 'conv'") as info:
        verify(bad, original, SHAPES)
    assert "\n" not in str(info.value)


def test_load_failure_is_one_clean_line():
    # passes the ONNX checker (ops of an unknown domain are not checked) but onnxruntime
    # cannot load it: no kernel for the op
    original = classifier()
    custom = classifier()
    custom.graph.node[1].op_type = "MyRelu"
    custom.graph.node[1].domain = "com.example"
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(VerificationError, match="load the pruned model") as info:
        verify(custom, original, SHAPES)
    message = str(info.value)
    assert "\n" not in message
    assert ".cc:" not in message  # ORT's C++ source location is stripped
    assert "MyRelu" in message


def test_unavailable_provider():
    m = classifier()
    with pytest.raises(OnnxPruneError, match="NoSuchExecutionProvider.*available: .*CPUExecutionProvider"):
        verify(m, m, SHAPES, providers=("NoSuchExecutionProvider",))


def test_big_model_goes_by_path(monkeypatch):
    # Pretend every model is over the 2 GB limit: checker and onnxruntime read a saved
    # copy with external data; the caller's proto must stay untouched.
    monkeypatch.setattr(verify_mod, "PROTOBUF_LIMIT", 0)
    original = classifier(seed=4)
    pruned = pruned_channels(original, [1, 3])
    before = pruned.SerializeToString()
    result = verify(pruned, original, SHAPES)
    assert result.output_shapes == {"logits": (2, 10)}
    assert pruned.SerializeToString() == before
    assert all(t.data_location == TensorProto.DEFAULT for t in pruned.graph.initializer)


def test_run_model_returns_outputs_and_ignores_extra_feeds():
    m = classifier()
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    out = run_model(m, {"x": x, "unused": np.zeros(1, np.float32)})
    assert list(out) == ["logits"]
    assert out["logits"].shape == (3, 10)
    assert out["logits"].dtype == np.float32


def test_run_model_missing_feed():
    with pytest.raises(VerificationError, match="'x'"):
        run_model(classifier(), {})


def test_output_fidelity_is_frozen():
    fid = OutputFidelity(0.0, 0.0, 1.0, None)
    with pytest.raises(Exception):
        fid.cosine = 0.5  # type: ignore[misc]


# --------------------------------------------------------------------------- oracle


def test_oracle_mismatch_is_an_error_naming_output_and_error():
    """A pruned model that differs from the oracle reference by more than rounding is refused."""
    model = classifier()
    wrong = classifier(weights={**weights_of(model), "fc.bias": weights_of(model)["fc.bias"] + 1e-2})
    ok = verify(model, model, SHAPES, reference=model).oracle
    assert ok["status"] == "passed" and ok["max_abs_error"] == {"logits": 0.0}
    assert ok["tolerance"] == {"logits": 1e-4} and ok["abs_tolerance"] == {"logits": 1e-6}
    with pytest.raises(VerificationError) as exc:
        verify(wrong, model, SHAPES, reference=model)
    msg = str(exc.value)
    assert "\n" not in msg and "surgery oracle: output 'logits'" in msg
    assert "max abs error 0.01 > 0.0001 x max|ref|" in msg


def test_oracle_floor_does_not_hide_a_wrong_saturated_output():
    """The absolute floor (1e-6 for float32) covers the Sigmoid's rounding near 0, not a wrong
    logit: a head bias off by 4 (outputs ~1e-7 -> ~6e-6) is still refused."""
    from tiny_models import build_saturated_sigmoid

    model = build_saturated_sigmoid(0, bias=-16.0)
    wrong = build_saturated_sigmoid(0, bias=-12.0)
    shapes = {"x": (1, 3, 32, 32)}
    assert verify(model, model, shapes, reference=model).oracle["status"] == "passed"
    with pytest.raises(VerificationError, match=r"surgery oracle: output 'y' .* \+ 1e-06"):
        verify(wrong, model, shapes, reference=model)
