"""Tests of onnxprune.io: loading errors, opset checks, atomic saving."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import io as oio
from onnxprune.errors import ModelLoadError, OutputPathError, UnsupportedModelError
from onnxprune.io import default_output_path, load_model, save_model


def _model(opset: int = 13, weight_elems: int = 4) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(weight_elems, dtype=np.float32).reshape(1, -1), "w")
    node = helper.make_node("Add", ["x", "w"], ["y"], name="add")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight_elems])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight_elems])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _write(path: Path, model: onnx.ModelProto) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


# ----------------------------------------------------------------------------- load


def test_load_roundtrip(tmp_path):
    p = _write(tmp_path / "m.onnx", _model())
    m = load_model(p)
    assert [n.op_type for n in m.graph.node] == ["Add"]
    assert numpy_helper.to_array(m.graph.initializer[0]).tolist() == [[0, 1, 2, 3]]


def test_load_missing_file_names_file(tmp_path):
    with pytest.raises(ModelLoadError, match=r"nope\.onnx: no such file"):
        load_model(tmp_path / "nope.onnx")


def test_load_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="is a directory"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "payload",
    [b"", b"hello, this is definitely not an onnx model\n", bytes(range(256)) * 3, b"\x08\x07"],
)
def test_load_non_onnx_bytes(tmp_path, payload):
    p = tmp_path / "junk.onnx"
    p.write_bytes(payload)
    with pytest.raises(ModelLoadError) as info:
        load_model(p)
    msg = str(info.value)
    assert "junk.onnx" in msg and "\n" not in msg


def test_load_truncated(tmp_path):
    data = _model(weight_elems=64).SerializeToString()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"trunc\.onnx"):
        load_model(p)


@pytest.mark.parametrize("opset", [7, 8, 22, 23])
def test_load_rejects_opset(tmp_path, opset):
    p = _write(tmp_path / "old.onnx", _model(opset=opset))
    with pytest.raises(UnsupportedModelError, match=rf"old\.onnx: opset {opset} of the default domain is not supported \(9 to 21\)"):
        load_model(p)


@pytest.mark.parametrize("opset", [9, 21])
def test_load_accepts_opset_bounds(tmp_path, opset):
    p = _write(tmp_path / "ok.onnx", _model(opset=opset))
    assert load_model(p).opset_import[0].version == opset


def test_load_rejects_graph_without_real_input(tmp_path):
    c = numpy_helper.from_array(np.ones(2, np.float32), "c")
    graph = helper.make_graph(
        [helper.make_node("Neg", ["c"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [c],
    )
    p = _write(tmp_path / "noin.onnx", helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    with pytest.raises(UnsupportedModelError, match="no input"):
        load_model(p)


def test_load_external_data(tmp_path):
    model = _model(weight_elems=1024)
    sub = tmp_path / "sub"
    sub.mkdir()
    to_save = onnx.ModelProto()
    to_save.CopyFrom(model)  # onnx.save_model converts its argument to external data in place
    onnx.save_model(to_save, str(sub / "ext.onnx"), save_as_external_data=True, location="ext.bin", size_threshold=0)
    assert (sub / "ext.bin").exists()
    loaded = load_model(sub / "ext.onnx")
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), numpy_helper.to_array(model.graph.initializer[0]))


def test_load_missing_external_data(tmp_path):
    onnx.save_model(_model(weight_elems=1024), str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.bin", size_threshold=0)
    (tmp_path / "ext.bin").unlink()
    with pytest.raises(ModelLoadError, match=r"ext\.onnx: external data file ext\.bin"):
        load_model(tmp_path / "ext.onnx")


# ----------------------------------------------------------------------------- save


def test_default_output_path(tmp_path):
    assert default_output_path(tmp_path / "resnet.onnx") == tmp_path / "resnet.pruned.onnx"
    assert default_output_path("a/b.v2.onnx") == Path("a/b.v2.pruned.onnx")


def test_save_roundtrip_and_no_temp_left(tmp_path):
    out = save_model(_model(), tmp_path / "out.onnx")
    assert out == (tmp_path / "out.onnx").resolve()
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
    assert onnx.load(str(out)).graph.node[0].op_type == "Add"


def test_save_overwrites_atomically_existing_output(tmp_path):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old")
    save_model(_model(), target)
    assert load_model(target).graph.node[0].op_type == "Add"
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]


def test_save_refuses_input_path(tmp_path):
    src = _write(tmp_path / "in.onnx", _model())
    before = src.read_bytes()
    with pytest.raises(OutputPathError, match="input model"):
        save_model(_model(opset=14), src, input_path=src)
    # same file, different spelling
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputPathError):
        save_model(_model(opset=14), tmp_path / "d" / ".." / "in.onnx", input_path=src)
    link = tmp_path / "link.onnx"
    link.symlink_to(src)
    with pytest.raises(OutputPathError):
        save_model(_model(opset=14), link, input_path=src)
    assert src.read_bytes() == before


def test_save_missing_folder(tmp_path):
    with pytest.raises(OutputPathError, match="does not exist"):
        save_model(_model(), tmp_path / "missing" / "out.onnx")


def test_save_failure_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(oio.os, "replace", boom)
    with pytest.raises(OutputPathError, match="No space left"):
        save_model(_model(), target)
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
    assert target.read_bytes() == b"previous"


def test_save_large_uses_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(oio, "EXTERNAL_DATA_THRESHOLD", 1000)
    model = _model(weight_elems=2048)
    out = save_model(model, tmp_path / "big.onnx")
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    assert model.graph.initializer[0].data_location == TensorProto.DEFAULT  # caller's model untouched
    loaded = load_model(out)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), numpy_helper.to_array(model.graph.initializer[0]))


def test_save_writes_initializers_one_by_one_and_loads_back_equal(tmp_path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 80)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.arange(3, dtype=np.int64), "b")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 80])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="k", value="v")
    out = save_model(model, tmp_path / "m.onnx")
    assert onnx.load(str(out)).SerializeToString() == model.SerializeToString()
