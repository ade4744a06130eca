"""Files of the fuzz corpus (tests/test_fuzz.py): valid, unusual and broken models, data
and external-data attacks, written into one folder by :func:`write_corpus`.

Every file is made here, deterministically (seed 0); nothing is downloaded.
"""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from tiny_models import ALL_BUILDERS, build_chain

_RNG = np.random.default_rng(0)


def _w(*shape: int) -> np.ndarray:
    return (_RNG.standard_normal(shape) * 0.3).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset: int = 16, ir: int = 8) -> onnx.ModelProto:
    g = h.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=ir)


def if_outer_read() -> onnx.ModelProto:
    """An If whose then-branch Conv reads the outer tensor ``t`` (8 channels) by name."""
    then = h.make_graph([h.make_node("Conv", ["t", "W2"], ["o1"], name="tc", kernel_shape=[1, 1])], "then", [],
                        [h.make_tensor_value_info("o1", T.FLOAT, None)])
    other = h.make_graph([h.make_node("Relu", ["t"], ["o2"], name="er")], "else", [],
                         [h.make_tensor_value_info("o2", T.FLOAT, None)])
    nodes = [h.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             h.make_node("Relu", ["c1"], ["t"], name="relu1"),
             h.make_node("Conv", ["t", "W4"], ["u"], name="conv4", kernel_shape=[1, 1]),
             h.make_node("If", ["cond"], ["z"], name="if1", then_branch=then, else_branch=other)]
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                  [h.make_tensor_value_info("z", T.FLOAT, [1, 8, 8, 8]), h.make_tensor_value_info("u", T.FLOAT, [1, 4, 8, 8])],
                  [nh.from_array(_w(8, 3, 3, 3), "W1"), nh.from_array(_w(8), "B1"), nh.from_array(_w(8, 8, 1, 1), "W2"),
                   nh.from_array(_w(4, 8, 1, 1), "W4"), nh.from_array(np.array(True), "cond")])


def if_inner_conv() -> onnx.ModelProto:
    """An If with a Conv and its own initializer inside the then-branch, then a prunable tail."""
    then = h.make_graph([h.make_node("Conv", ["t", "inner.W"], ["o1"], name="tc", kernel_shape=[1, 1])], "then", [],
                        [h.make_tensor_value_info("o1", T.FLOAT, None)], initializer=[nh.from_array(_w(8, 8, 1, 1), "inner.W")])
    other = h.make_graph([h.make_node("Relu", ["t"], ["o2"], name="er")], "else", [],
                         [h.make_tensor_value_info("o2", T.FLOAT, None)])
    nodes = [h.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             h.make_node("Relu", ["c1"], ["t"], name="relu1"),
             h.make_node("If", ["cond"], ["z"], name="if1", then_branch=then, else_branch=other),
             h.make_node("Conv", ["z", "W5"], ["a"], name="conv5", kernel_shape=[1, 1]),
             h.make_node("Relu", ["a"], ["b"], name="relu5"),
             h.make_node("Conv", ["b", "W6"], ["y"], name="conv6", kernel_shape=[1, 1])]
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                  [h.make_tensor_value_info("y", T.FLOAT, [1, 4, 8, 8])],
                  [nh.from_array(_w(8, 3, 3, 3), "W1"), nh.from_array(_w(16, 8, 1, 1), "W5"),
                   nh.from_array(_w(4, 16, 1, 1), "W6"), nh.from_array(np.array(True), "cond")])


def fp16_behind_cast() -> onnx.ModelProto:
    """The chain model with every Conv weight stored as fp16 and widened by a Cast."""
    m = build_chain()
    casts = []
    for init in m.graph.initializer:
        if init.name.endswith("weight"):
            name = init.name
            init.CopyFrom(nh.from_array(nh.to_array(init).astype(np.float16), name + "_h"))
            casts.append(h.make_node("Cast", [name + "_h"], [name], name="cast_" + name, to=T.FLOAT))
    old = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(casts + old)
    return m


def all_dtype(elem: int, np_dtype) -> onnx.ModelProto:
    """The chain model computed entirely in another float type."""
    m = build_chain()
    for init in m.graph.initializer:
        init.CopyFrom(nh.from_array(nh.to_array(init).astype(np_dtype), init.name))
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.elem_type = elem
    return m


def bf16_model() -> onnx.ModelProto:
    import ml_dtypes

    return all_dtype(T.BFLOAT16, ml_dtypes.bfloat16)


def with_dims(dims, name_dims: dict[int, str] | None = None) -> onnx.ModelProto:
    m = build_chain()
    d = m.graph.input[0].type.tensor_type.shape.dim
    for i, v in enumerate(dims):
        if v is not None:
            d[i].dim_value = v
    for i, sym in (name_dims or {}).items():
        d[i].ClearField("dim_value")
        d[i].dim_param = sym
    return m


def ir3_initializers_as_inputs() -> onnx.ModelProto:
    """IR 3 convention: every initializer is also a graph input."""
    m = build_chain()
    m.ir_version = 3
    for init in m.graph.initializer:
        m.graph.input.append(h.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return m


def constant_nodes_and_identity() -> onnx.ModelProto:
    """Weights as Constant nodes, an Identity between layers, unnamed nodes."""
    m = build_chain()
    consts = [h.make_node("Constant", [], [t.name], value=t) for t in m.graph.initializer]
    del m.graph.initializer[:]
    nodes = list(m.graph.node)
    for n in nodes:
        if n.name == "relu1":
            n.output[0] = "relu1_pre"
    ident = h.make_node("Identity", ["relu1_pre"], ["relu1_out"])
    for n in nodes:
        n.name = ""
    del m.graph.node[:]
    m.graph.node.extend(consts + nodes + [ident])
    return m


def with_inf_weight() -> onnx.ModelProto:
    m = build_chain()
    for init in m.graph.initializer:
        if init.name == "conv2.weight":
            a = nh.to_array(init).copy()
            a[0, 0, 0, 0] = np.inf
            init.CopyFrom(nh.from_array(a, init.name))
    return m


def opset(version: int) -> onnx.ModelProto:
    m = build_chain()
    m.opset_import[0].version = version
    return m


def no_input() -> onnx.ModelProto:
    g = h.make_graph([h.make_node("Relu", ["c"], ["y"], name="r")], "g", [], [h.make_tensor_value_info("y", T.FLOAT, [2])],
                     initializer=[nh.from_array(np.ones(2, np.float32), "c")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 16)], ir_version=8)


def external(location: str, *, offset: int | None = None, length: int | None = None) -> onnx.ModelProto:
    """The chain model whose conv2.weight claims external data at ``location``."""
    m = build_chain()
    for init in m.graph.initializer:
        if init.name == "conv2.weight":
            init.ClearField("raw_data")
            init.data_location = T.EXTERNAL
            del init.external_data[:]
            for k, v in (("location", location), ("offset", offset), ("length", length)):
                if v is not None:
                    e = init.external_data.add()
                    e.key, e.value = k, str(v)
    return m


def _npz(path: Path, **arrays) -> None:
    np.savez(path, **arrays)


def write_corpus(root: Path) -> dict[str, Path]:
    """Write every corpus file under ``root`` and return ``{key: path}``."""
    files: dict[str, Path] = {}
    models = root / "models"
    models.mkdir(parents=True)

    def save(key: str, model: onnx.ModelProto, name: str | None = None) -> None:
        p = models / (name or f"{key}.onnx")
        p.write_bytes(model.SerializeToString())
        files[key] = p

    for name, build in ALL_BUILDERS.items():
        save(name, build())
    for key, make in {"if_outer": if_outer_read, "if_inner": if_inner_conv, "fp16_cast": fp16_behind_cast,
                      "fp16_all": lambda: all_dtype(T.FLOAT16, np.float16),
                      "f64_all": lambda: all_dtype(T.DOUBLE, np.float64), "bf16_all": bf16_model,
                      "dynamic": lambda: with_dims([None] * 4, {0: "N", 2: "H", 3: "W"}),
                      "dim_1e9": lambda: with_dims([10**9]), "dim_huge_hw": lambda: with_dims([1, 3, 300000, 300000]),
                      "ir3": ir3_initializers_as_inputs, "consts": constant_nodes_and_identity,
                      "inf_weight": with_inf_weight, "opset8": lambda: opset(8), "opset30": lambda: opset(30),
                      "no_input": no_input}.items():
        save(key, make())
    ir2 = build_chain()
    ir2.ir_version = 2
    save("ir2", ir2)
    no_out = build_chain()
    del no_out.graph.output[:]
    save("no_output", no_out)
    no_graph = onnx.ModelProto(ir_version=8)
    no_graph.opset_import.add().version = 17
    save("no_graph", no_graph)
    dup = build_chain()
    dup.graph.node[1].name = dup.graph.node[0].name
    save("dup_names", dup)
    cyc = build_chain()
    cyc.graph.node[0].input[0] = "relu2_out"  # a cycle
    save("cycle", cyc)
    unk = build_chain()
    unk.graph.node[2].op_type = "NoSuchOp"
    save("unknown_op", unk)
    custom = build_chain()
    custom.graph.node[2].domain = "com.example"
    custom.opset_import.add(domain="com.example", version=1)
    save("custom_domain", custom)
    bad_shape = build_chain()
    bad_shape.graph.initializer[0].dims[0] = 7  # raw data no longer fits the dims
    save("bad_init", bad_shape)

    good = (models / "chain.onnx").read_bytes()
    for key, data in {"empty": b"", "text": b"this is not an onnx model\n" * 20,
                      "random_bytes": _RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
                      "truncated": good[: len(good) // 2], "truncated_tiny": good[:10],
                      "zeros": bytes(2048), "npz_as_model": b"PK\x03\x04" + bytes(100)}.items():
        p = models / f"{key}.onnx"
        p.write_bytes(data)
        files[key] = p
    (models / "a_folder.onnx").mkdir()
    files["a_folder"] = models / "a_folder.onnx"

    ext = root / "ext"
    ext.mkdir()
    (root / "secret.bin").write_bytes(bytes(10000))
    weight_bytes = _w(12, 8, 3, 3).tobytes()
    (ext / "w.bin").write_bytes(weight_bytes)
    (ext / "short.bin").write_bytes(weight_bytes[:100])
    (ext / "subdir").mkdir()
    for key, kw in {"ext_ok": dict(location="w.bin"), "ext_missing": dict(location="nope.bin"),
                    "ext_parent": dict(location="../secret.bin"), "ext_abs": dict(location=str(root / "secret.bin")),
                    "ext_short": dict(location="short.bin"), "ext_offset": dict(location="w.bin", offset=10**12),
                    "ext_length": dict(location="w.bin", length=10**12), "ext_dir": dict(location="subdir"),
                    "ext_neg": dict(location="w.bin", offset=-5)}.items():
        p = ext / f"{key}.onnx"
        p.write_bytes(external(**kw).SerializeToString())
        files[key] = p

    data = root / "data"
    data.mkdir()
    x = _RNG.standard_normal((8, 3, 16, 16)).astype(np.float32)
    _npz(data / "good.npz", x=x, y=_RNG.integers(0, 16, 8))
    _npz(data / "unlabelled.npz", x=x)
    raw = (data / "good.npz").read_bytes()
    (data / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    (data / "garbage.npz").write_bytes(b"PK\x03\x04garbage" * 10)
    _npz(data / "no_x.npz", a=x)
    _npz(data / "nan.npz", x=np.full_like(x, np.nan))
    _npz(data / "int.npz", x=x.astype(np.int32))
    _npz(data / "wrong_shape.npz", x=x[:, :2])
    _npz(data / "bad_labels.npz", x=x, y=np.ones((8, 2), np.int64))
    np.save(data / "good.npy", x)
    np.save(data / "object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (data / "text.npy").write_bytes(b"not numpy")
    (data / "data.csv").write_text("1,2,3\n")
    # a huge declared array in a tiny file (the header says 10^12 elements)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 3, 1000, 1000)})
    (data / "huge_header.npy").write_bytes(buf.getvalue() + b"\0" * 64)
    with zipfile.ZipFile(data / "huge_header.npz", "w") as z:
        z.writestr("x.npy", (data / "huge_header.npy").read_bytes())
    images = data / "images"
    for cls in ("a", "b"):
        (images / cls).mkdir(parents=True)
        for i in range(3):
            _png(images / cls / f"{i}.png")
    broken = data / "broken_images"
    broken.mkdir()
    _png(broken / "ok.png")
    (broken / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (data / "empty_folder").mkdir()
    for key in ("good.npz", "unlabelled.npz", "truncated.npz", "garbage.npz", "no_x.npz", "nan.npz", "int.npz",
                "wrong_shape.npz", "bad_labels.npz", "good.npy", "object.npy", "text.npy", "data.csv",
                "huge_header.npy", "huge_header.npz"):
        files["data/" + key] = data / key
    for key in ("images", "broken_images", "empty_folder"):
        files["data/" + key] = data / key
    files["mnist"] = root / "mnist_cnn.onnx"
    shutil.copy(Path(__file__).resolve().parents[1] / "models" / "mnist_cnn.onnx", files["mnist"])
    return files


def _png(path: Path) -> None:
    from PIL import Image

    Image.fromarray(_RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)


def corpus_hashes(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root``."""
    import hashlib

    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
