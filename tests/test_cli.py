"""The ``onnxprune`` command line: ``compress`` and ``analyze``.

Success paths check the files the CLI writes (pruned model, report JSON, plan JSON,
analysis JSON) and that the pruned model runs in onnxruntime with the original output
shapes. Error paths check the contract of :mod:`onnxprune.cli`: exit code 2, a single
line on stderr starting with ``error:`` that names the problem, no traceback, and
nothing written: the folder holding the input is left exactly as it was (no output
model, no temporary file) and the input model is unchanged byte for byte.

Most cases run in-process with click's CliRunner; a few run the installed ``onnxprune``
script in a subprocess to check the real exit status and stderr.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from onnxprune.cli import main
from onnxprune.pipeline import prepare
from onnxprune.planning import PruningPlan
from tiny_models import ALL_BUILDERS, INPUT_NAME, INPUT_SHAPES, OUTPUT_NAME, OUTPUT_SHAPES

TARGET = 0.5
TOLERANCE = 0.03


# ----------------------------------------------------------------------------- helpers


def _save_tiny(folder: Path, name: str, *, dynamic_hw: bool = False) -> Path:
    """Write tiny model ``name`` to ``folder/<name>.onnx`` (optionally with symbolic N, H, W)."""
    model = ALL_BUILDERS[name]()
    stem = name
    if dynamic_hw:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        for i, sym in ((0, "N"), (2, "H"), (3, "W")):
            dims[i].ClearField("dim_value")
            dims[i].dim_param = sym
        stem = f"{name}_dyn"
    path = folder / f"{stem}.onnx"
    onnx.save(model, str(path))
    return path


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _listing(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` (recursively) -> file bytes (None for folders)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def _run_ort(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed)))


def _feed(name: str) -> dict[str, np.ndarray]:
    return {INPUT_NAME: np.random.default_rng(0).standard_normal(INPUT_SHAPES[name]).astype(np.float32)}


def _assert_ok(result) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"


def _assert_user_error(result, *fragments: str) -> str:
    """Exit code 2, one stderr line 'error: ...' containing every fragment, no traceback."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    # A non-user exception would be kept on result.exception (exit code 1) by CliRunner.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got: {result.stderr!r}"
    line = lines[0]
    assert line.startswith("error:"), line
    for frag in fragments:
        assert frag.lower() in line.lower(), f"{frag!r} not in {line!r}"
    return line


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d


# ------------------------------------------------------------------------ compress: ok


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_compress_default_output_runs_with_same_shapes(workdir: Path, name: str) -> None:
    src = _save_tiny(workdir, name)
    src_bytes = src.read_bytes()
    result = _invoke("compress", src, "--target-macs", TARGET, "--no-bench")
    _assert_ok(result)

    out = workdir / f"{name}.pruned.onnx"
    assert out.is_file(), f"default output {out.name} not written; folder: {sorted(_listing(workdir))}"
    assert sorted(_listing(workdir)) == sorted([src.name, out.name]), "stray files beside the input"
    assert src.read_bytes() == src_bytes, "the input model was modified"
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    # No tensor may lose all its channels (e.g. an emptied Split output, split=[4, 0]).
    inferred = onnx.shape_inference.infer_shapes(pruned, strict_mode=True)
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value")]
        assert 0 not in dims, f"tensor {vi.name} is empty: {dims}"

    feed = _feed(name)
    before, after = _run_ort(src, feed), _run_ort(out, feed)
    assert list(after) == list(before) == [OUTPUT_NAME]
    assert after[OUTPUT_NAME].shape == before[OUTPUT_NAME].shape == OUTPUT_SHAPES[name]


def test_compress_output_option(workdir: Path, tmp_path: Path) -> None:
    src = _save_tiny(workdir, "residual")
    dest_dir = tmp_path / "elsewhere"
    dest_dir.mkdir()
    dest = dest_dir / "small.onnx"
    _assert_ok(_invoke("compress", src, "-o", dest, "--target-macs", TARGET, "--no-bench"))
    assert dest.is_file()
    assert not (workdir / "residual.pruned.onnx").exists(), "-o given but the default path was written"
    assert sorted(_listing(dest_dir)) == ["small.onnx"]
    feed = _feed("residual")
    assert _run_ort(dest, feed)[OUTPUT_NAME].shape == OUTPUT_SHAPES["residual"]

    # --output (long form) overwrites an existing output file (not the input).
    _assert_ok(_invoke("compress", src, "--output", dest, "--target-macs", 0.6, "--no-bench"))
    assert _run_ort(dest, feed)[OUTPUT_NAME].shape == OUTPUT_SHAPES["residual"]


@pytest.mark.parametrize("name", ["chain", "lenet", "concat", "flatten_gemm"])
def test_compress_report_json(workdir: Path, name: str) -> None:
    src = _save_tiny(workdir, name)
    report_path = workdir / "report.json"
    _assert_ok(_invoke("compress", src, "--target-macs", TARGET, "--no-bench", "--report", report_path))
    rep = json.loads(report_path.read_text())

    for key in ("input", "output", "criterion", "target", "macs", "params", "latency_ms", "groups",
                "stage_seconds", "reachable", "warnings", "fidelity"):
        assert key in rep, f"report lacks {key!r}"
    assert rep["output"] == str(workdir / f"{name}.pruned.onnx")
    assert rep["criterion"] == "l1"
    assert rep["target"] == "macs=0.5"
    for key in ("macs", "params"):
        block = rep[key]
        assert set(block) >= {"before", "after", "ratio"}
        assert isinstance(block["before"], int) and isinstance(block["after"], int)
        assert 0 < block["after"] <= block["before"]
        assert block["ratio"] == pytest.approx(block["after"] / block["before"])
    assert rep["macs"]["ratio"] <= TARGET + TOLERANCE
    assert rep["reachable"] is None
    assert rep["latency_ms"]["before"] is None and rep["latency_ms"]["after"] is None  # --no-bench

    groups = rep["groups"]
    assert isinstance(groups, list) and groups
    for g in groups:
        assert set(g) >= {"name", "op", "kept", "total", "blocked_reason"}
        assert isinstance(g["kept"], int) and isinstance(g["total"], int)
        assert 1 <= g["kept"] <= g["total"]
        if g["blocked_reason"] is not None:
            assert g["kept"] == g["total"], f"blocked group {g['name']} lost channels"
    assert any(g["kept"] < g["total"] for g in groups), "no group was pruned"


def test_compress_plan_out_round_trips(workdir: Path) -> None:
    src = _save_tiny(workdir, "concat")
    plan_path, report_path = workdir / "plan.json", workdir / "report.json"
    _assert_ok(_invoke("compress", src, "--target-macs", TARGET, "--no-bench",
                       "--plan-out", plan_path, "--report", report_path))
    plan = PruningPlan.from_json(plan_path.read_text())
    analysis = prepare(src).analysis
    plan.validate(analysis)
    assert plan.num_removed > 0
    assert plan.target is not None and plan.target.value == TARGET

    rep = json.loads(report_path.read_text())
    kept_in_report = {g["name"]: g["kept"] for g in rep["groups"]}
    for gid, name in plan.group_names.items():
        assert len(plan.kept(gid)) == kept_in_report[name], name
    assert plan.macs_after == rep["macs"]["after"]


def test_compress_unreachable_target_without_strict_succeeds(workdir: Path) -> None:
    src = _save_tiny(workdir, "barrier")
    report_path = workdir / "r.json"
    result = _invoke("compress", src, "--target-macs", 0.05, "--no-bench", "--report", report_path)
    _assert_ok(result)
    rep = json.loads(report_path.read_text())
    assert rep["reachable"] is not None and rep["reachable"].startswith("macs=")
    reachable = float(rep["reachable"].split("=", 1)[1])
    assert abs(rep["macs"]["ratio"] - reachable) <= TOLERANCE
    assert any("out of reach" in w for w in rep["warnings"])
    assert "out of reach" in result.output.replace("\n", " ")
    assert (workdir / "barrier.pruned.onnx").is_file()


# ------------------------------------------------------------------------- analyze


def test_analyze_lists_blocked_groups_with_reasons(workdir: Path) -> None:
    src = _save_tiny(workdir, "barrier")
    json_path = workdir / "analysis.json"
    result = _invoke("analyze", src, "--json", json_path)
    _assert_ok(result)
    assert "Softmax" in result.output
    assert "blocked" in result.output.lower()

    data = json.loads(json_path.read_text())
    assert set(data) >= {"model", "macs", "params", "input_shapes", "groups", "layers"}
    assert data["input_shapes"] == {INPUT_NAME: list(INPUT_SHAPES["barrier"])}
    blocked = [g for g in data["groups"] if g["blocked_reason"]]
    assert any("Softmax" in g["blocked_reason"] for g in blocked), blocked
    for g in data["groups"]:
        if g["blocked_reason"]:
            assert not g["prunable"], g
        assert g["size"] > 0 and g["members"]
    assert any(g["prunable"] for g in data["groups"]), "conv2's 6 channels should stay prunable"
    assert data["macs"] > 0 and data["params"] > 0
    # analyze writes nothing but the JSON.
    assert sorted(_listing(workdir)) == sorted([src.name, json_path.name])


def test_analyze_verbose_lists_prunable_groups(workdir: Path) -> None:
    src = _save_tiny(workdir, "chain")
    result = _invoke("analyze", src, "-v")
    _assert_ok(result)
    assert "prunable" in result.output
    assert "conv1" in result.output and "conv2" in result.output


def test_analyze_missing_file(workdir: Path) -> None:
    _assert_user_error(_invoke("analyze", workdir / "nope.onnx"), "nope.onnx", "no such file")


def test_analyze_bad_input_shape(workdir: Path) -> None:
    src = _save_tiny(workdir, "chain")
    _assert_user_error(_invoke("analyze", src, "--input-shape", "q:1,3,16,16"), "'q'")


# ------------------------------------------------------------------ compress: errors


def _assert_nothing_written(workdir: Path, args: list, *fragments: str) -> str:
    before = _listing(workdir)
    result = _invoke("compress", *args, "--no-bench")
    line = _assert_user_error(result, *fragments)
    assert _listing(workdir) == before, (
        f"files changed after a failed run: {sorted(set(_listing(workdir)) ^ set(before))}")
    return line


def test_error_missing_file(workdir: Path) -> None:
    _assert_nothing_written(workdir, [workdir / "missing.onnx"], "missing.onnx", "no such file")
    assert not (workdir / "missing.pruned.onnx").exists()


def test_error_directory(workdir: Path) -> None:
    d = workdir / "adir.onnx"
    d.mkdir()
    _assert_nothing_written(workdir, [d], "adir.onnx", "directory")


def test_error_random_bytes(workdir: Path) -> None:
    bad = workdir / "random.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    _assert_nothing_written(workdir, [bad], "random.onnx", "not an ONNX model")


def test_error_empty_file(workdir: Path) -> None:
    bad = workdir / "empty.onnx"
    bad.write_bytes(b"")
    _assert_nothing_written(workdir, [bad], "empty.onnx")


def test_error_text_file(workdir: Path) -> None:
    bad = workdir / "notes.onnx"
    bad.write_text("this is not a model\n")
    _assert_nothing_written(workdir, [bad], "notes.onnx")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
def test_error_truncated_onnx(workdir: Path, fraction: float) -> None:
    full = onnx.load_from_string(ALL_BUILDERS["lenet"]().SerializeToString()).SerializeToString()
    bad = workdir / "trunc.onnx"
    bad.write_bytes(full[: int(len(full) * fraction)])
    _assert_nothing_written(workdir, [bad], "trunc.onnx")


def test_error_output_equals_input(workdir: Path) -> None:
    src = _save_tiny(workdir, "chain")
    _assert_nothing_written(workdir, [src, "-o", src, "--target-macs", TARGET], "output path is the input")


def test_error_output_equals_input_other_spelling(workdir: Path) -> None:
    src = _save_tiny(workdir, "chain")
    (workdir / "sub").mkdir()
    alias = workdir / "sub" / ".." / "chain.onnx"
    _assert_nothing_written(workdir, [src, "-o", alias, "--target-macs", TARGET], "output path is the input")


def test_error_output_folder_missing(workdir: Path) -> None:
    src = _save_tiny(workdir, "chain")
    _assert_nothing_written(workdir, [src, "-o", workdir / "no_such_dir" / "out.onnx", "--target-macs", TARGET],
                            "no_such_dir")


@pytest.mark.parametrize(("option", "value"), [
    ("--target-macs", "1.5"), ("--target-macs", "0"), ("--target-macs", "1"), ("--target-macs", "-0.2"),
    ("--target-params", "0"), ("--ratio", "1.0"),
])
def test_error_invalid_target(workdir: Path, option: str, value: str) -> None:
    src = _save_tiny(workdir, "chain")
    line = _assert_nothing_written(workdir, [src, option, value], "between 0 and 1")
    assert option.lstrip("-").split("-")[-1] in line  # names the kind: macs / params / ratio


@pytest.mark.parametrize("extra", [
    ["--target-macs", "0.5", "--ratio", "0.3"],
    ["--target-macs", "0.5", "--target-params", "0.5"],
    ["--ratio", "0.3", "--target-params", "0.5"],
])
def test_error_two_targets(workdir: Path, extra: list[str]) -> None:
    src = _save_tiny(workdir, "chain")
    _assert_nothing_written(workdir, [src, *extra], "only one of")


@pytest.mark.parametrize(("spec", "fragment"), [
    ("x:1,a", "'a'"),
    ("x1,3,16,16", "NAME:D0"),
    ("x:1,0,16,16", "positive"),
    (":1,3,16,16", "name is empty"),
])
def test_error_input_shape_malformed(workdir: Path, spec: str, fragment: str) -> None:
    src = _save_tiny(workdir, "chain")
    _assert_nothing_written(workdir, [src, "--input-shape", spec], fragment)


def test_error_input_shape_unknown_name(workdir: Path) -> None:
    src = _save_tiny(workdir, "chain")
    _assert_nothing_written(workdir, [src, "--input-shape", "images:1,3,16,16"], "unknown input", "'images'")


def test_error_input_shape_given_twice(workdir: Path) -> None:
    src = _save_tiny(workdir, "chain")
    _assert_nothing_written(workdir, [src, "--input-shape", "x:1,3,16,16", "--input-shape", "x:1,3,16,16"],
                            "twice")


def test_error_input_shape_wrong_rank(workdir: Path) -> None:
    src = _save_tiny(workdir, "chain")
    _assert_nothing_written(workdir, [src, "--input-shape", "x:1,3,16"], "rank 3", "rank 4")


def test_error_input_shape_contradicts_fixed_dims(workdir: Path) -> None:
    # lenet declares x as 1x1x28x28: 2x2 spatial contradicts the fixed dims.
    src = _save_tiny(workdir, "lenet")
    _assert_nothing_written(workdir, [src, "--input-shape", "x:1,1,2,2"], "'x'", "28")


def test_error_input_shape_too_small_for_model(workdir: Path) -> None:
    # Same lenet with symbolic N/H/W: 2x2 is accepted as a shape but the 3x3 conv cannot run on it.
    src = _save_tiny(workdir, "lenet", dynamic_hw=True)
    _assert_nothing_written(workdir, [src, "--input-shape", "x:1,1,2,2"], "1x1x2x2")


def test_error_default_shape_does_not_fit(workdir: Path) -> None:
    # Symbolic H/W default to 224, which the Flatten->Gemm(1600) head cannot take: the
    # message must point at --input-shape.
    src = _save_tiny(workdir, "lenet", dynamic_hw=True)
    _assert_nothing_written(workdir, [src], "--input-shape")


def test_dynamic_model_with_input_shape_compresses(workdir: Path) -> None:
    src = _save_tiny(workdir, "lenet", dynamic_hw=True)
    _assert_ok(_invoke("compress", src, "--input-shape", "x:1,1,28,28", "--target-macs", TARGET, "--no-bench"))
    out = workdir / "lenet_dyn.pruned.onnx"
    assert _run_ort(out, _feed("lenet"))[OUTPUT_NAME].shape == (1, 10)


def test_error_strict_target_unreachable(workdir: Path) -> None:
    src = _save_tiny(workdir, "barrier")
    _assert_nothing_written(workdir, [src, "--target-macs", "0.05", "--strict-target"], "out of reach", "macs=0.05")


def test_error_unknown_criterion_is_usage_error(workdir: Path) -> None:
    src = _save_tiny(workdir, "chain")
    before = _listing(workdir)
    result = _invoke("compress", src, "--criterion", "bogus", "--no-bench")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert _listing(workdir) == before


# ------------------------------------------------------------------ real subprocesses


def _script() -> list[str]:
    exe = shutil.which("onnxprune")
    if exe is None:
        pytest.skip("the onnxprune console script is not on PATH (pip install -e .)")
    return [exe]


def test_script_success_exit_code(workdir: Path) -> None:
    src = _save_tiny(workdir, "chain")
    proc = subprocess.run([*_script(), "compress", str(src), "--target-macs", str(TARGET), "--no-bench"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (workdir / "chain.pruned.onnx").is_file()


@pytest.mark.parametrize("case", ["missing", "random_bytes", "strict_target", "same_output"])
def test_script_user_error_exit_code(workdir: Path, case: str) -> None:
    src = _save_tiny(workdir, "barrier")
    args = {
        "missing": [str(workdir / "missing.onnx")],
        "random_bytes": [str(workdir / "random.onnx")],
        "strict_target": [str(src), "--target-macs", "0.05", "--strict-target"],
        "same_output": [str(src), "-o", str(src)],
    }[case]
    if case == "random_bytes":
        (workdir / "random.onnx").write_bytes(np.random.default_rng(1).bytes(2048))
    before = _listing(workdir)
    proc = subprocess.run([*_script(), "compress", *args, "--no-bench"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert _listing(workdir) == before


def test_script_version() -> None:
    proc = subprocess.run([*_script(), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "0.1.0" in proc.stdout


# ------------------------------------------------- side outputs (report, plan) and criterion options


@pytest.mark.parametrize("option", ["--report", "--plan-out"])
def test_side_output_equal_to_input_is_refused(workdir: Path, option: str) -> None:
    src = _save_tiny(workdir, "chain")
    _assert_nothing_written(workdir, [src, "--target-macs", TARGET, option, src], "input")


def test_analyze_json_equal_to_input_is_refused(workdir: Path) -> None:
    src = _save_tiny(workdir, "chain")
    before = _listing(workdir)
    _assert_user_error(_invoke("analyze", src, "--json", src), "input")
    assert _listing(workdir) == before


@pytest.mark.parametrize("option", ["--report", "--plan-out"])
def test_side_output_equal_to_output_model_is_refused(workdir: Path, option: str) -> None:
    src = _save_tiny(workdir, "chain")
    out = workdir / "out.onnx"
    result = _invoke("compress", src, "-o", out, "--target-macs", TARGET, "--no-bench", option, out)
    if result.exit_code == 0:  # then at least the model must still be a model
        onnx.load(str(out))
    _assert_user_error(result)


@pytest.mark.parametrize("option", ["--report", "--plan-out"])
def test_unwritable_side_output_leaves_nothing(workdir: Path, option: str) -> None:
    src = _save_tiny(workdir, "chain")
    _assert_nothing_written(workdir, [src, "--target-macs", TARGET, option, workdir / "no_such_dir" / "x.json"],
                            "no_such_dir")


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_invalid_cpmc_exponent_is_refused(workdir: Path, value: str) -> None:
    src = _save_tiny(workdir, "lenet")
    _assert_nothing_written(workdir, [src, "--criterion", "cpmc", "--cpmc-a", value, "--target-macs", TARGET],
                            "cpmc")


# ------------------------------------------------------------------------ calibration data options


@pytest.mark.parametrize("criterion", ["infcp", "ifso"])
def test_data_driven_criterion_without_data_is_refused(workdir: Path, criterion: str) -> None:
    src = _save_tiny(workdir, "lenet")
    _assert_nothing_written(workdir, [src, "--criterion", criterion, "--target-macs", TARGET], criterion)


def test_missing_calibration_file_is_refused(workdir: Path) -> None:
    src = _save_tiny(workdir, "lenet")
    _assert_nothing_written(workdir, [src, "--data", workdir / "nope.npz", "--target-macs", TARGET], "nope.npz")


def test_bad_image_size_is_refused(workdir: Path) -> None:
    src = _save_tiny(workdir, "lenet")
    (workdir / "imgs").mkdir()
    _assert_nothing_written(workdir, [src, "--data", workdir / "imgs", "--image-size", "a,b",
                                      "--target-macs", TARGET], "--image-size")


def test_taylor_without_data_names_the_option(workdir: Path) -> None:
    src = _save_tiny(workdir, "lenet")
    _assert_nothing_written(workdir, [src, "--criterion", "taylor", "--target-macs", TARGET], "taylor", "--data")


def test_taylor_with_data_writes_a_model_that_runs(workdir: Path, tmp_path: Path) -> None:
    src = _save_tiny(workdir, "lenet")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cal.npz", x=rng.normal(size=(16, 1, 28, 28)).astype(np.float32),
             y=rng.integers(0, 10, 16))
    out = workdir / "t.onnx"
    result = _invoke("compress", src, "--criterion", "taylor", "--data", tmp_path / "cal.npz", "--batch-size", "8",
                     "--target-macs", TARGET, "--no-bench", "-o", out, "--report", tmp_path / "r.json",
                     "--steps", "1", "--no-recover")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["criterion"] == "taylor"
    assert report["macs"]["after"] / report["macs"]["before"] <= TARGET + TOLERANCE
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": rng.normal(size=(1, 1, 28, 28)).astype(np.float32)})
    assert y.shape == (1, 10)


# ------------------------------------------------------------ compress: defaults that follow the data
def _labelled_lenet_data(folder: Path, n: int = 40) -> Path:
    """Inputs labelled with the tiny LeNet's own argmax (the original scores 100 %)."""
    model = ALL_BUILDERS["lenet"]()
    x = np.random.default_rng(1).standard_normal((n, 1, 28, 28)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = np.array([sess.run(None, {INPUT_NAME: x[i:i + 1]})[0].argmax() for i in range(n)], dtype=np.int64)
    path = folder / "cal.npz"
    np.savez(path, x=x, y=y)
    return path


def test_compress_with_data_defaults_to_taylor_progressive_recovery_and_held_out(workdir: Path, tmp_path: Path) -> None:
    src = _save_tiny(workdir, "lenet")
    data = _labelled_lenet_data(tmp_path)
    out, rep, png = workdir / "p.onnx", tmp_path / "r.json", tmp_path / "tradeoff.png"
    result = _invoke("compress", src, "--data", data, "--target-macs", "0.5", "--no-bench", "--batch-size", "8",
                     "--finetune-epochs", "1", "-o", out, "--report", rep, "--plot", png)
    _assert_ok(result)
    d = json.loads(rep.read_text())
    assert d["criterion"] == "taylor"
    assert len(d["schedule"]) == 4  # auto: one step per 15 % removed
    assert all(s["recovery"] and "finetune" in s["recovery"] for s in d["schedule"] if s["held_out"] is not None)
    held = d["held_out"]
    assert held["kind"] == "accuracy" and held["original"] == 100.0 and held["samples"] >= 4
    assert "held-out" in result.output and "on held-out samples" in " ".join(result.output.split())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert d["macs"]["ratio"] <= 0.5 + TOLERANCE
    assert _run_ort(out, _feed("lenet"))[OUTPUT_NAME].shape == OUTPUT_SHAPES["lenet"]


def test_compress_without_data_says_no_accuracy_was_measured(workdir: Path) -> None:
    src = _save_tiny(workdir, "lenet")
    result = _invoke("compress", src, "--target-macs", "0.5", "--no-bench", "-o", workdir / "p.onnx")
    _assert_ok(result)
    assert "accuracy was not measured" in " ".join(result.output.split())


@pytest.mark.parametrize("args,fragments", [
    (["--max-drop", "1"], ["--max-drop", "--data"]),
    (["--steps", "zero"], ["--steps"]),
    (["--steps", "0"], ["--steps", ">= 1"]),
    (["--finetune-epochs", "x"], ["--finetune-epochs"]),
    (["--recover"], ["--recover", "--data"]),
    (["--finetune-augment", "rotate"], ["augment", "rotate"]),
])
def test_progressive_options_are_checked(workdir: Path, tmp_path: Path, args, fragments) -> None:
    src = _save_tiny(workdir, "lenet")
    extra = ["--data", _labelled_lenet_data(tmp_path)] if "--finetune-augment" in args else []
    before = _listing(workdir)
    _assert_user_error(_invoke("compress", src, "--target-macs", "0.5", "--no-bench", *extra, *args), *fragments)
    assert _listing(workdir) == before


def test_compress_that_removes_nothing_writes_the_input_unchanged(workdir: Path) -> None:
    """Nothing prunable (every group excluded): the written model is the input as it came,
    not its canonical form (which may run slower), and the report says so."""
    src = _save_tiny(workdir, "residual")
    out, report = workdir / "out.onnx", workdir / "r.json"
    result = _invoke("compress", src, "-o", out, "--target-macs", TARGET, "--no-bench", "--exclude", "*",
                     "--report", report)
    _assert_ok(result)
    rep = json.loads(report.read_text())
    assert any("input model unchanged" in w for w in rep["warnings"])
    assert onnx.load(str(out)).graph == onnx.load(str(src)).graph
