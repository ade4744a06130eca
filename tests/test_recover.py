"""Fine-tuning (onnxprune.recover.training), the recovery stage of compress, the finetune CLI.

1. Fine-tuning a tiny pruned classifier lowers its loss: distillation (KL to the teacher)
   without labels, cross-entropy with labels, SGD and a temperature as well.
2. The written-back weights, saved and reloaded, give in onnxruntime what the trained torch
   module gave (1e-5 relative); only weights were trained (BN running statistics, integer
   and shape-like constants are unchanged).
3. An interruption (KeyboardInterrupt or an exception inside the training loop) leaves no
   model and no temporary file: library and CLI.
4. CLI: finetune writes a model that runs; compress --recalibrate-bn --finetune-epochs
   reports the recovery; clear errors with exit code 2 (no --data, no teacher and no
   labels, a teacher with another input shape, a bad option).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from onnxprune.analysis import analyze
from onnxprune.cli import main
from onnxprune.data import from_arrays
from onnxprune.errors import OnnxPruneError
from onnxprune.executor.graph_module import TorchGraph
from onnxprune.io import load_model, save_model
from onnxprune.recover import FinetuneOptions, finetune, trainable_initializers
from onnxprune.shapes import measure_shapes
from onnxprune.surgery import apply_plan
from tiny_models import ALL_BUILDERS, INPUT_NAME, build_chain, build_const_channel, build_resize_pad

build_flatten_reshape = ALL_BUILDERS["flatten_reshape_gemm"]

ort.set_default_logger_severity(3)


def ort_run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    src = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {INPUT_NAME: x})[0]


def pruned_pair():
    """(original, pruned) tiny classifier: 2 of 4 conv1 channels and 2 of 6 conv2 channels cut."""
    model = build_const_channel(seed=3)
    a = analyze(model, measure_shapes(model, {INPUT_NAME: (2, 3, 8, 8)}))
    removed = {a.group("conv1").id: np.array([0, 2]), a.group("conv2").id: np.array([1, 4])}
    return model, apply_plan(model, a, removed)


def inputs(n: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ------------------------------------------------------------------------------ library


@pytest.mark.parametrize("opts, labelled", [
    (FinetuneOptions(epochs=4, lr=3e-3, batch_size=16, device="cpu"), False),
    (FinetuneOptions(epochs=4, lr=3e-3, batch_size=16, device="cpu"), True),
    (FinetuneOptions(epochs=4, lr=3e-2, optimizer="sgd", schedule="constant", temperature=2.0,
                     batch_size=16, device="cpu"), False),
])
def test_finetune_lowers_the_loss(opts, labelled):
    teacher, student = pruned_pair()
    x = inputs()
    y = ort_run(teacher, x).argmax(1) if labelled else None
    res = finetune(student, from_arrays(x, y), teacher=teacher, options=opts)
    assert res.loss == ("ce" if labelled else "kl")
    assert res.steps == 4 * 3
    assert res.loss_after < 0.8 * res.loss_before
    assert res.epoch_losses[-1] < res.epoch_losses[0]
    # the student's own file is untouched
    assert weights(student).keys() == weights(res.model).keys()


def test_written_back_weights_match_the_trained_torch_module(tmp_path, monkeypatch):
    teacher, student = pruned_pair()
    x = inputs(32)
    probe = torch.from_numpy(inputs(5, seed=9))
    seen = {}
    real = TorchGraph.write_back

    def spy(self, model):  # the trained module's outputs, just before the weights leave torch
        with torch.no_grad():
            seen["y"] = self(probe)[0].cpu().numpy()
        return real(self, model)

    monkeypatch.setattr(TorchGraph, "write_back", spy)
    res = finetune(student, from_arrays(x), teacher=teacher,
                   options=FinetuneOptions(epochs=2, lr=1e-2, batch_size=8, device="cpu"))
    path = save_model(res.model, tmp_path / "tuned.onnx")
    got = ort_run(str(path), probe.numpy())
    np.testing.assert_allclose(got, seen["y"], rtol=1e-5, atol=1e-5 * np.abs(seen["y"]).max())
    assert not np.allclose(got, ort_run(student, probe.numpy()), atol=1e-3)  # training changed it

    before, after = weights(student), weights(load_model(path))
    trained = set(trainable_initializers(student))
    for name, value in before.items():
        if name in trained and name.endswith(".weight"):
            assert not np.array_equal(value, after[name]), name
        if name not in trained:
            assert np.array_equal(value, after[name]), name
    assert {"bn1.mean", "bn1.var", "bn3.mean", "bn3.var"}.isdisjoint(trained)
    assert {"bn1.scale", "bn1.bias", "conv1.weight", "fc.bias"} <= trained


def test_fixed_batch_one_model_trains_like_the_batched_one():
    """A model declaring batch 1 is fed one sample at a time (micro-batches, outputs joined,
    onnxprune.batching): the same steps as the symbolic-batch model takes on whole batches
    (more cases, B > --batch-size and N < B: tests/test_batching.py)."""
    teacher, student = pruned_pair()
    fixed = onnx.ModelProto()
    fixed.CopyFrom(student)
    for vi in (fixed.graph.input[0], fixed.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    x = inputs(12)
    opts = FinetuneOptions(epochs=1, lr=1e-2, batch_size=4, device="cpu", optimizer="sgd")
    a = finetune(student, from_arrays(x), teacher=teacher, options=opts, measure_loss=False)
    b = finetune(fixed, from_arrays(x), teacher=teacher, options=opts, measure_loss=False)
    assert a.steps == b.steps == 3
    wa, wb = weights(a.model), weights(b.model)
    for name in trainable_initializers(student):
        np.testing.assert_allclose(wb[name], wa[name], rtol=1e-4, atol=1e-6)
    # a hard-coded batch-1 Reshape (the case this exists for) trains and runs
    model = build_flatten_reshape()
    res = finetune(model, from_arrays(np.random.default_rng(0).standard_normal((6, 3, 16, 16)).astype(np.float32)),
                   teacher=model, options=FinetuneOptions(batch_size=4, device="cpu"))
    assert res.steps == 2 and ort_run(res.model, np.zeros((1, 3, 16, 16), np.float32)).shape == (1, 5)


def test_trainable_initializers_leave_constants_alone():
    names = set(trainable_initializers(build_resize_pad()))
    assert "resize.scales" not in names and "pad.pads" not in names
    assert {"conv1.weight", "conv1.bias", "head.weight"} <= names
    chain = set(trainable_initializers(build_chain()))
    assert {"bn1.scale", "bn1.bias"} <= chain and not {"bn1.mean", "bn1.var"} & chain


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_training_returns_nothing(exc):
    teacher, student = pruned_pair()
    calls = []

    def stop(epoch, step, loss):
        calls.append(step)
        if len(calls) == 2:
            raise exc("stop")

    with pytest.raises(exc):
        finetune(student, from_arrays(inputs(32)), teacher=teacher,
                 options=FinetuneOptions(epochs=3, batch_size=8, device="cpu"), callback=stop)
    assert calls == [0, 1]


def test_library_errors():
    teacher, student = pruned_pair()
    with pytest.raises(OnnxPruneError, match="teacher"):
        finetune(student, from_arrays(inputs(8)))  # no labels, no teacher
    with pytest.raises(OnnxPruneError, match="--lr"):
        FinetuneOptions(lr=0)
    with pytest.raises(OnnxPruneError, match="optimizer"):
        FinetuneOptions(optimizer="lbfgs")
    other = build_chain()  # [1,3,16,16] input, [1,16,16,16] output
    with pytest.raises(OnnxPruneError, match="input 'x' has shape"):
        finetune(student, from_arrays(inputs(8)), teacher=other)


# ------------------------------------------------------------------------------ CLI


@pytest.fixture
def folder(tmp_path):
    teacher, student = pruned_pair()
    onnx.save(teacher, tmp_path / "orig.onnx")
    onnx.save(student, tmp_path / "pruned.onnx")
    x = inputs(40)
    np.savez(tmp_path / "calib.npz", x=x)
    np.savez(tmp_path / "labelled.npz", x=x, y=ort_run(teacher, x).argmax(1))
    return tmp_path


def test_cli_finetune_writes_a_model_that_runs(folder):
    before = files(folder)
    r = CliRunner().invoke(main, ["finetune", str(folder / "pruned.onnx"), "--teacher", str(folder / "orig.onnx"),
                                  "--data", str(folder / "calib.npz"), "--epochs", "2", "--lr", "3e-3",
                                  "--batch-size", "8", "--device", "cpu", "--report", str(folder / "ft.json")])
    assert r.exit_code == 0, r.output
    assert files(folder) - before == {"pruned.finetuned.onnx", "ft.json"}
    out = ort_run(str(folder / "pruned.finetuned.onnx"), inputs(3))
    assert out.shape == (3, 7)
    rep = json.loads((folder / "ft.json").read_text())
    assert rep["finetune"]["loss"] == "kl" and rep["finetune"]["loss_after"] < rep["finetune"]["loss_before"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_cli_interrupted_finetune_leaves_nothing(folder, monkeypatch, exc):
    real = torch.optim.Adam.step
    calls = []

    def step(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise exc("boom")
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    before = files(folder)
    r = CliRunner().invoke(main, ["finetune", str(folder / "pruned.onnx"), "--teacher", str(folder / "orig.onnx"),
                                  "--data", str(folder / "calib.npz"), "--batch-size", "8", "--device", "cpu",
                                  "-o", str(folder / "out.onnx")])
    assert r.exit_code != 0 and len(calls) == 3
    if exc is KeyboardInterrupt:
        assert r.exit_code == 130 and "interrupted; nothing written" in r.output
    assert files(folder) == before  # no output, no temporary file


@pytest.mark.parametrize("args, message", [
    (["finetune", "{pruned}", "--teacher", "{orig}"], "finetune needs --data"),
    (["finetune", "{pruned}", "--data", "{calib}"], "without labels needs the original model as teacher"),
    (["finetune", "{pruned}", "--teacher", "{chain}", "--data", "{calib}"], "--teacher {chain}: input 'x' has shape"),
    (["finetune", "{pruned}", "--teacher", "{orig}", "--data", "{calib}", "--lr", "-1"], "--lr must be"),
    (["finetune", "{pruned}", "--teacher", "{orig}", "--data", "{calib}", "-o", "{orig}"], "output path is an input"),
    (["compress", "{orig}", "--recalibrate-bn"], "need calibration data"),
    (["compress", "{orig}", "--data", "{calib}", "--finetune-epochs", "1", "--finetune-lr", "0"],
     "--finetune-lr must be"),
])
def test_cli_errors(folder, args, message):
    onnx.save(build_chain(), folder / "chain.onnx")
    names = {k: str(folder / f"{v}.onnx") for k, v in (("pruned", "pruned"), ("orig", "orig"), ("chain", "chain"))}
    names["calib"] = str(folder / "calib.npz")
    before = files(folder)
    r = CliRunner().invoke(main, [a.format(**names) for a in args])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and message.format(**names) in r.output
    assert files(folder) == before


def test_cli_compress_with_recovery(folder):
    r = CliRunner().invoke(main, ["compress", str(folder / "orig.onnx"), "-o", str(folder / "small.onnx"),
                                  "--target-macs", "0.6", "--no-bench", "--data", str(folder / "labelled.npz"),
                                  "--recalibrate-bn", "--finetune-epochs", "1", "--finetune-lr", "1e-3",
                                  "--finetune-loss", "auto", "--steps", "1", "--val-split", "0.1",
                                  "--batch-size", "8", "--device", "cpu", "--report", str(folder / "rep.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((folder / "rep.json").read_text())
    rec = report["recovery"]
    assert rec["bn_recalibration"]["nodes"] >= 1 and rec["finetune"]["loss"] == "ce"
    # 40 samples: 4 held out (one per class), 36 train -> ceil(36 / 8) = 5 steps
    assert rec["finetune"]["steps"] == 5
    held = report["held_out"]
    assert held["kind"] == "accuracy" and held["samples"] == 4 and held["train"]["samples"] == 36
    assert 0.0 <= held["final"] <= 100.0 and rec["finetune"]["val_by_epoch"][rec["finetune"]["best_epoch"]] == \
        held["final"]
    assert "recovery:" in r.output
    assert ort_run(str(folder / "small.onnx"), inputs(2)).shape == (2, 7)
