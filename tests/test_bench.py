"""Tests of onnxprune.runtime.latency. Wall-clock values are never asserted, only their consistency."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.runtime.latency import LatencyStats, measure_interleaved, measure_latency, reference_session, speedup
from onnxprune.errors import ModelLoadError, OnnxPruneError


def classifier(channels: int = 8, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """x[N,3,16,16] -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> logits[N,classes]."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "conv.weight"),
        numpy_helper.from_array(rng.standard_normal((classes, channels)).astype(np.float32), "fc.weight"),
        numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "fc.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def assert_consistent(stats: LatencyStats, repeat: int) -> None:
    assert stats.runs == repeat
    assert 0 <= stats.min_ms <= stats.median_ms <= stats.p90_ms
    assert stats.min_ms <= stats.mean_ms
    assert all(np.isfinite([stats.min_ms, stats.median_ms, stats.p90_ms, stats.mean_ms]))


def test_measure_latency_from_proto():
    stats = measure_latency(classifier(), {"x": (4, 3, 16, 16)}, warmup=2, repeat=7, threads=1)
    assert_consistent(stats, 7)
    assert stats.provider == "CPUExecutionProvider"
    assert stats.threads == 1
    assert stats.batch == 4


def test_measure_interleaved_alternates_the_models_runs(monkeypatch, tmp_path):
    import onnxprune.runtime.latency as latency

    order = []
    real = latency._Timed.timed_run

    def recording(self):
        order.append(self.shapes and (self.model if isinstance(self.model, str) else self.model.graph.name))
        return real(self)

    monkeypatch.setattr(latency._Timed, "timed_run", recording)
    a, b = classifier(channels=8), classifier(channels=16, seed=1)
    a.graph.name, b.graph.name = "a", "b"
    path = tmp_path / "b.onnx"
    onnx.save(b, str(path))
    sa, sb = measure_interleaved([a, str(path)], {"x": (2, 3, 16, 16)}, warmup=1, repeat=5, threads=1)
    assert order == ["a", str(path)] * 5  # A, B, A, B, ...: both see the same load
    for st in (sa, sb):
        assert_consistent(st, 5)
        assert st.batch == 2 and st.threads == 1
    with pytest.raises(OnnxPruneError, match="at least one model"):
        measure_interleaved([], {"x": (1, 3, 16, 16)})
    with pytest.raises(OnnxPruneError, match="repeat"):
        measure_interleaved([a], {"x": (1, 3, 16, 16)}, repeat=0)


def test_reference_session_is_built_once_and_compared_interleaved(monkeypatch):
    import onnxprune.runtime.latency as latency

    built, order = [], []
    real_open, real_run = latency._Timed._open, latency._Timed.timed_run

    def opening(self):
        built.append(self.model.graph.name)
        return real_open(self)

    def running(self):
        order.append(self.model.graph.name)
        return real_run(self)

    monkeypatch.setattr(latency._Timed, "_open", opening)
    monkeypatch.setattr(latency._Timed, "timed_run", running)
    ref, a, b = classifier(8), classifier(16, seed=1), classifier(4, seed=2)
    ref.graph.name, a.graph.name, b.graph.name = "ref", "a", "b"
    with reference_session(ref, {"x": (1, 3, 16, 16)}, warmup=1, repeat=4, threads=1) as compare:
        ra, sa = compare(a)
        rb, sb = compare(b)
    assert built == ["ref", "a", "b"]  # the reference's session is built once
    assert order == ["ref", "a"] * 4 + ["ref", "b"] * 4
    for st in (ra, sa, rb, sb):
        assert_consistent(st, 4)  # each comparison times the reference anew


def test_measure_latency_default_threads_is_none():
    stats = measure_latency(classifier(), {"x": (1, 3, 16, 16)}, warmup=0, repeat=3)
    assert_consistent(stats, 3)
    assert stats.threads is None
    assert stats.batch == 1


def test_measure_latency_from_path_with_external_data(tmp_path):
    model = classifier(channels=16)
    path = tmp_path / "m.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location="m.onnx.data", size_threshold=0,
    )
    assert (tmp_path / "m.onnx.data").exists()
    stats = measure_latency(path, {"x": (2, 3, 16, 16)}, warmup=1, repeat=5)
    assert_consistent(stats, 5)
    assert stats.batch == 2
    # and as a str
    assert measure_latency(str(path), {"x": (2, 3, 16, 16)}, warmup=0, repeat=2).runs == 2


def test_stats_are_frozen():
    stats = measure_latency(classifier(), {"x": (1, 3, 16, 16)}, warmup=0, repeat=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.median_ms = 0.0  # type: ignore[misc]
    d = stats.to_dict()
    assert d["median"] == stats.median_ms and d["runs"] == 2 and d["batch"] == 1


def test_unavailable_provider_names_it_and_available_ones():
    with pytest.raises(OnnxPruneError, match="'NoSuchExecutionProvider'.*available: .*CPUExecutionProvider"):
        measure_latency(classifier(), {"x": (1, 3, 16, 16)}, providers=("NoSuchExecutionProvider",))


@pytest.mark.parametrize("kwargs", [{"repeat": 0}, {"warmup": -1}, {"threads": 0}])
def test_bad_options(kwargs):
    with pytest.raises(OnnxPruneError):
        measure_latency(classifier(), {"x": (1, 3, 16, 16)}, **kwargs)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="nope.onnx"):
        measure_latency(tmp_path / "nope.onnx", {"x": (1, 3, 16, 16)})


def _stats(median: float) -> LatencyStats:
    return LatencyStats(
        median_ms=median, p90_ms=median * 1.1, mean_ms=median, min_ms=median * 0.9,
        runs=10, provider="CPUExecutionProvider", threads=1, batch=1,
    )


def test_speedup():
    assert speedup(_stats(10.0), _stats(4.0)) == pytest.approx(2.5)
    assert speedup(_stats(4.0), _stats(8.0)) == pytest.approx(0.5)
    assert speedup(_stats(3.0), _stats(3.0)) == 1.0
    assert speedup(_stats(1.0), _stats(0.0)) == float("inf")
