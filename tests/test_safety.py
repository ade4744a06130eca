"""Run-wide guards (issue 11): staged outputs, memory budget, lazy torch, subgraphs, storage
dtypes and the surgery oracle inside verify."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from fuzz_corpus import fp16_behind_cast, if_inner_conv, if_outer_read
from onnxprune.canonicalize import canonicalize, restore_storage_dtypes
from onnxprune.cli import main
from onnxprune.errors import OnnxPruneError, OutputPathError, VerificationError
from onnxprune.io import save_model, write_text_atomic
from onnxprune.safety import check_allocation, memory_budget, parse_size, staged_outputs
from tiny_models import build_chain

REPO = Path(__file__).resolve().parents[1]


def test_staged_outputs_commit_only_when_the_block_succeeds(tmp_path: Path) -> None:
    with staged_outputs():
        save_model(build_chain(), tmp_path / "m.onnx")
        write_text_atomic(tmp_path / "r.json", "{}")
        assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "r.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "r.json"]


@pytest.mark.parametrize("exc", [OnnxPruneError("late"), KeyboardInterrupt()])
def test_staged_outputs_remove_everything_on_failure(tmp_path: Path, exc: BaseException) -> None:
    with pytest.raises(type(exc)):
        with staged_outputs():
            save_model(build_chain(), tmp_path / "m.onnx")
            write_text_atomic(tmp_path / "r.json", "{}")
            raise exc
    assert os.listdir(tmp_path) == []


def test_late_report_failure_leaves_no_model(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "chain.onnx"
    onnx.save(build_chain(), str(src))

    def fail(self, path):
        raise OutputPathError(f"{path}: cannot write (disk full)")

    monkeypatch.setattr("onnxprune.report.CompressReport.write_json", fail)
    r = CliRunner().invoke(main, ["compress", str(src), "-o", str(tmp_path / "p.onnx"), "--no-bench",
                                  "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and "disk full" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["chain.onnx"]


def test_trailing_slash_output_writes_no_file(tmp_path: Path) -> None:
    src = tmp_path / "chain.onnx"
    onnx.save(build_chain(), str(src))
    r = CliRunner().invoke(main, ["compress", str(src), "-o", str(tmp_path / "newdir") + "/", "--no-bench"])
    assert r.exit_code == 2 and "newdir" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["chain.onnx"]


def test_memory_budget_names_what_and_bytes() -> None:
    assert parse_size("4G") == 4 << 30 and parse_size("512k") == 512 << 10 and parse_size("100") == 100
    with pytest.raises(OnnxPruneError, match="--max-memory"):
        parse_size("lots")
    with memory_budget(1000):
        check_allocation(1000, "x")
        with pytest.raises(OnnxPruneError, match=r"random input 'x' would take 1001 B, over the memory budget of 1000 B"):
            check_allocation(1001, "random input 'x'")


def test_data_free_commands_do_not_import_torch(tmp_path: Path) -> None:
    src = tmp_path / "chain.onnx"
    onnx.save(build_chain(), str(src))
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from onnxprune.cli import main\n"
        f"for args in (['compress', {str(src)!r}, '-o', {str(tmp_path / 'p.onnx')!r}, '--bench-repeat', '1'],\n"
        f"             ['analyze', {str(src)!r}], ['bench', {str(src)!r}, '--repeat', '1', '--warmup', '0']):\n"
        "    r = CliRunner().invoke(main, args)\n"
        "    assert r.exit_code == 0, r.output\n"
        "    assert 'torch' not in sys.modules, args\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_folding_keeps_if_subgraphs_intact() -> None:
    import onnxruntime as ort

    for model in (if_outer_read(), if_inner_conv()):
        canon = canonicalize(model).model
        ort.InferenceSession(canon.SerializeToString(), providers=["CPUExecutionProvider"])
        # the input proto is untouched (graphsurgeon's importer renames subgraph tensors in place)
        assert model.SerializeToString() == onnx.load_from_string(model.SerializeToString()).SerializeToString()


def test_tensors_read_by_a_subgraph_are_blocked() -> None:
    from onnxprune.pipeline import prepare

    model = if_outer_read()
    path = REPO / ".pytest_if_outer.onnx"
    try:
        onnx.save(model, str(path))
        a = prepare(path).analysis
    finally:
        path.unlink(missing_ok=True)
    conv1 = next(g for g in a.groups if g.name == "conv1")
    assert conv1.blocked_reason and "subgraph of If node if1" in conv1.blocked_reason


def test_restore_storage_dtypes_keeps_fp16_weights() -> None:
    original = fp16_behind_cast()
    canon = canonicalize(original).model
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in canon.graph.initializer)  # folding widened them
    restored = restore_storage_dtypes(canon, original)
    onnx.checker.check_model(restored, full_check=True)
    narrow = {t.name for t in restored.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    assert narrow == {t.name for t in original.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    weight_bytes = lambda m: sum(t.ByteSize() for t in m.graph.initializer)  # noqa: E731
    assert weight_bytes(restored) == weight_bytes(original)
    # unchanged when nothing is stored narrow
    plain = build_chain()
    assert restore_storage_dtypes(plain, plain) is plain


def test_verify_runs_the_oracle_and_catches_a_wrong_cut() -> None:
    from onnxprune.runtime.verify import verify

    model = build_chain()
    shapes = {"x": (1, 3, 16, 16)}
    ok = verify(model, model, shapes, reference=model)
    assert ok.oracle["status"] == "passed" and ok.to_dict()["oracle"]["max_rel_error"]["y"] == 0.0
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    w = next(t for t in wrong.graph.initializer if t.name == "conv3.bias")
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) + 1.0, w.name))
    with pytest.raises(VerificationError, match="surgery oracle: output 'y'"):
        verify(wrong, model, shapes, reference=model)


def test_oracle_masks_take_the_tensor_dtype() -> None:
    from fuzz_corpus import all_dtype
    from onnxprune.pipeline import prepare
    from onnxprune.surgery.oracle import zeroed_reference

    path = REPO / ".pytest_fp16.onnx"
    try:
        onnx.save(all_dtype(onnx.TensorProto.FLOAT16, np.float16), str(path))
        prep = prepare(path)
    finally:
        path.unlink(missing_ok=True)
    g = next(g for g in prep.analysis.groups if g.prunable)
    ref = zeroed_reference(prep.model, prep.analysis, {g.id: np.array([0])})
    masks = [t for t in ref.graph.initializer if t.name.startswith("__oracle_mask")]
    assert masks and all(t.data_type == onnx.TensorProto.FLOAT16 for t in masks)


def test_openmp_spinning_is_bounded_unless_the_user_chose():
    from onnxprune.entry import GOMP_SPINCOUNT, tune_openmp

    env: dict = {}
    assert tune_openmp(env) is True and env == {"GOMP_SPINCOUNT": GOMP_SPINCOUNT}
    for mine in ({"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "ACTIVE"}):
        env = dict(mine)
        assert tune_openmp(env) is False and env == mine  # the user's setting is kept


def test_the_program_sets_it_before_torch_loads(tmp_path):
    """`python -m onnxprune` exports the bound before torch is imported (what libgomp reads)."""
    probe = ("import os, sys, onnxprune.entry as e; import onnxprune.cli as c; "
             "c.main = lambda **k: print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules); e.main()")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["10000", "False"]  # set, and torch not loaded yet
