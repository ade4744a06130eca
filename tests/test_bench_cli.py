"""`onnxprune bench` and the latency parts of `compress`: statistics, JSON schema, batch
handling, providers, exit codes and messages. Wall-clock values are never asserted, only
their consistency."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

from onnxprune.runtime.latency import available_providers, batch_shapes, measure_latency, resolve_provider
from onnxprune.runtime.bench import bench_models
from onnxprune.cli import main
from onnxprune.cli.bench import parse_batches, parse_round_to
from onnxprune.errors import InputShapeError, OnnxPruneError
from test_bench import classifier  # symbolic batch dim "N"
from tiny_models import ALL_BUILDERS  # fixed batch dim 1

FAST = ["--warmup", "1", "--repeat", "3", "--threads", "1"]


@pytest.fixture
def models(tmp_path):
    sym, fixed = tmp_path / "sym.onnx", tmp_path / "fixed.onnx"
    onnx.save(classifier(), str(sym))
    onnx.save(classifier(channels=16, seed=1), str(tmp_path / "sym16.onnx"))
    onnx.save(ALL_BUILDERS["lenet"](), str(fixed))
    return tmp_path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_bench_models_statistics_and_speedups(models):
    res = bench_models([models / "sym.onnx", models / "sym16.onnx"], ["CPUExecutionProvider"], [1, 3],
                       warmup=1, repeat=4, threads=1)
    assert [(c.model.endswith("sym.onnx"), c.batch) for c in res.cells] == [(True, 1), (True, 3), (False, 1),
                                                                            (False, 3)]
    for c in res.cells:
        s = c.stats
        assert s.runs == 4 and s.batch == c.batch and s.threads == 1
        assert 0 < s.min_ms <= s.median_ms <= s.p90_ms and s.min_ms <= s.mean_ms
        assert s.peak_memory_mb is not None and s.peak_memory_mb >= 0
        assert c.input_shapes == {"x": (c.batch, 3, 16, 16)}
    first = {c.batch: c.stats.median_ms for c in res.cells[:2]}
    assert [c.speedup_vs_first for c in res.cells[:2]] == [1.0, 1.0]
    for c in res.cells[2:]:
        assert c.speedup_vs_first == pytest.approx(first[c.batch] / c.stats.median_ms)


def test_bench_json_schema(models):
    report = models / "bench.json"
    r = run("bench", models / "sym.onnx", models / "sym16.onnx", "--batch", "1,2", *FAST, "--report", report)
    assert r.exit_code == 0, r.output
    d = json.loads(report.read_text())
    assert set(d) == {"settings", "results"}
    assert d["settings"] == {"warmup": 1, "repeat": 3, "threads": 1, "providers": ["CPUExecutionProvider"],
                             "batches": [1, 2], "skipped": d["settings"]["skipped"]}
    assert len(d["settings"]["skipped"]) == 3 - len(available_providers()[0])
    assert len(d["results"]) == 4
    for row in d["results"]:
        assert set(row) == {"model", "provider", "batch", "input_shapes", "latency_ms", "runs", "peak_memory_mb",
                            "speedup_vs_first"}
        assert set(row["latency_ms"]) == {"median", "p90", "mean", "min"}
        assert row["runs"] == 3 and row["input_shapes"] == {"x": [row["batch"], 3, 16, 16]}
        assert row["latency_ms"]["min"] <= row["latency_ms"]["median"] <= row["latency_ms"]["p90"]
    assert [row["speedup_vs_first"] for row in d["results"][:2]] == [1.0, 1.0]
    # the table names both models and the speedup column
    assert "sym16.onnx" in r.output and "speedup" in r.output


def test_batch_shapes_rules(models):
    sym, fixed = onnx.load(str(models / "sym.onnx")), onnx.load(str(models / "fixed.onnx"))
    assert batch_shapes(sym, 8) == {"x": (8, 3, 16, 16)}
    assert batch_shapes(fixed, 1) == {"x": (1, 1, 28, 28)}
    with pytest.raises(InputShapeError, match="fixed batch dim of 1.*batch 8"):
        batch_shapes(fixed, 8, label="fixed.onnx")
    with pytest.raises(InputShapeError, match="at least 1"):
        batch_shapes(sym, 0)
    assert measure_latency(sym, batch_shapes(sym, 5), warmup=0, repeat=2).batch == 5


def test_parse_batches_and_round_to():
    assert parse_batches(("1", "8")) == (1, 8)
    assert parse_batches(("1,8", "4", "8")) == (1, 8, 4)
    assert parse_batches(()) == (1,)
    for bad in (("x",), ("0",), ("1,-2",), ("1,,2",)):
        with pytest.raises(OnnxPruneError, match="--batch"):
            parse_batches(bad)
    assert parse_round_to("auto") == "auto" and parse_round_to("AUTO") == "auto" and parse_round_to("8") == 8
    for bad in ("0", "x", "1.5"):
        with pytest.raises(OnnxPruneError, match="--round-to"):
            parse_round_to(bad)


def test_resolve_provider():
    assert resolve_provider("cpu") == "CPUExecutionProvider"
    assert resolve_provider("CUDA") == "CUDAExecutionProvider"
    assert resolve_provider("TensorrtExecutionProvider") == "TensorrtExecutionProvider"
    with pytest.raises(OnnxPruneError, match="unknown execution provider 'gpu'"):
        resolve_provider("gpu")


@pytest.mark.parametrize("args,message", [
    (["nope.onnx"], "nope.onnx"),
    (["{fixed}", "--batch", "8"], "fixed batch dim of 1; it cannot run at batch 8"),
    (["{sym}", "--batch", "x"], "--batch 'x'"),
    (["{sym}", "--batch", "0"], "batch size 0"),
    (["{sym}", "--provider", "foo"], "unknown execution provider 'foo'"),
    (["{sym}", "--repeat", "0"], "--repeat"),
    (["{sym}", "--threads", "0"], "--threads"),
    (["{sym}", "--report", "{sym}"], "must differ"),
])
def test_bench_cli_errors(models, args, message):
    args = [a.format(sym=models / "sym.onnx", fixed=models / "fixed.onnx") for a in args]
    r = run("bench", *args)
    assert r.exit_code == 2
    assert "error: " in r.output and message in r.output
    assert "Traceback" not in r.output


def test_bench_cli_missing_gpu_provider(models):
    if "CUDAExecutionProvider" in available_providers()[0]:
        pytest.skip("this onnxruntime offers CUDA")
    r = run("bench", models / "sym.onnx", "--provider", "cuda", *FAST)
    assert r.exit_code == 2 and "'CUDAExecutionProvider' is not available" in r.output
    # not asked for: skipped with a message, CPU still measured
    r = run("bench", models / "sym.onnx", *FAST)
    assert r.exit_code == 0 and "CUDAExecutionProvider skipped" in r.output and "CPU" in r.output


def test_bench_channel_sweep_cli(models):
    report = models / "sweep.json"
    r = run("bench", models / "sym.onnx", "--channel-sweep", "--sweep-window", "4", "--threads", "1",
            "--report", report)
    assert r.exit_code == 0, r.output
    d = json.loads(report.read_text())["channel_sweep"]
    assert len(d) == 1 and d[0]["round_to"] in (1, 2, 4, 8, 16, 32)
    assert f"round_to {d[0]['round_to']}" in r.output
    tables = d[0]["tables"]
    assert [t["axis"] for t in tables] == ["out", "in"]  # one 3->8 conv: filters, then input channels
    assert tables[0]["counts"] == [5, 6, 7, 8] and tables[1]["counts"] == [1, 2, 3]
    assert all(v > 0 for t in tables for v in t["ms"])


def test_compress_round_to_auto_and_latency_target(models):
    out, report = models / "out.onnx", models / "report.json"
    r = run("compress", models / "fixed.onnx", "-o", out, "--round-to", "auto", "--target-latency", "0.7",
            "--bench-repeat", "3", "--threads", "1", "--report", report)
    assert r.exit_code == 0, r.output
    d = json.loads(report.read_text())
    assert d["target"] == "latency=0.7"
    assert d["round_to"]["chosen"] in (1, 2, 4, 8, 16, 32) and d["round_to"]["tables"]
    lt = d["latency_target"]
    assert 1 <= lt["measurements"] <= 4 and len(lt["rounds"]) == lt["measurements"]
    assert lt["reached"] == (lt["measured_fraction"] <= 0.7 * 1.02)
    assert lt["measured_fraction"] == pytest.approx(d["latency_ms"]["after"]["median"]
                                                    / d["latency_ms"]["before"]["median"])
    assert "realized_over_ideal" in d["latency_ms"]
    assert "latency target 0.7" in r.output and out.exists()


def test_compress_cli_bad_latency_options(models):
    for args, msg in ((["--target-latency", "1.5"], "latency=1.5"),
                      (["--target-latency", "0.5", "--target-macs", "0.5"], "only one of"),
                      (["--round-to", "seven"], "--round-to"),
                      (["--provider", "cuda", "--no-bench"], "CUDAExecutionProvider")):
        out = models / "o.onnx"
        r = run("compress", models / "fixed.onnx", "-o", out, *args)
        if "CUDAExecutionProvider" in available_providers()[0] and "cuda" in args:
            continue
        assert r.exit_code == 2 and msg in r.output, (args, r.output)
        assert not out.exists()


def test_not_faster_warning_names_the_provider(monkeypatch, models):
    """A pruned model measured no faster than the original is warned about in the report."""
    import onnxprune.pipeline as pipeline
    from onnxprune.runtime.latency import LatencyStats

    def same(models, shapes, **kw):
        return [LatencyStats(1.0, 1.0, 1.0, 1.0, 1, kw["providers"][0], None, 1) for _ in models]

    monkeypatch.setattr(pipeline, "measure_interleaved", same)
    report = models / "r.json"
    r = run("compress", models / "fixed.onnx", "-o", models / "o.onnx", "--target-macs", "0.5", "--report", report)
    assert r.exit_code == 0, r.output
    d = json.loads(report.read_text())
    assert any("not faster than the original on CPUExecutionProvider" in w for w in d["warnings"])
    assert d["latency_ms"]["speedup"] == 1.0
    assert d["latency_ms"]["realized_over_ideal"] == pytest.approx(1.0 / d["latency_ms"]["ideal_speedup"])
    assert "not faster" in r.output


def test_compress_default_round_to_is_chosen_by_measuring_whole_cuts(models):
    out, report = models / "out.onnx", models / "report.json"
    r = run("compress", models / "fixed.onnx", "-o", out, "--target-macs", "0.5", "--bench-repeat", "3",
            "--threads", "1", "--report", report)
    assert r.exit_code == 0, r.output
    d = json.loads(report.read_text())
    probe = d["round_to"]["probe"]
    assert probe is not None and probe["ms"] and all(v > 0 for v in probe["ms"].values())
    assert all(v <= 0.5 + 1e-9 for v in probe["macs_kept"].values())
    fastest = min(probe["ms"].values())
    # the smallest round_to whose cut is within 5 % of the fastest
    assert probe["chosen"] == min(int(n) for n, v in probe["ms"].items() if v <= fastest * 1.05)
    assert d["round_to"]["chosen"] == probe["chosen"]
    assert d["schedule"][0]["round_to"] >= probe["chosen"]
    assert "chosen by measuring the target's cut" in r.output
