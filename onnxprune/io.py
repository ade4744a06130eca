"""Reading and writing ONNX models with clear, one-line errors.

Rules this module follows:

* :func:`load_model` never lets a protobuf or onnx traceback escape for bad user
  input: a missing file, a directory, bytes that are not ONNX, a truncated
  file or missing external data all raise :class:`~onnxprune.errors.ModelLoadError`
  naming the file.  External data is loaded relative to the model's folder.
* Only models whose default-domain (``""`` / ``"ai.onnx"``) opset lies between
  :data:`MIN_OPSET` and :data:`MAX_OPSET` inclusive are accepted; anything else
  raises :class:`~onnxprune.errors.UnsupportedModelError`.
* :func:`save_model` writes atomically (temporary file in the destination folder,
  then :func:`os.replace`), never overwrites the input model and never leaves a
  temporary file behind when it fails.  Models above :data:`EXTERNAL_DATA_THRESHOLD`
  bytes are written with their tensors in ``<name>.data`` beside the model.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from onnxprune.errors import ModelLoadError, OutputPathError, UnsupportedModelError, first_line
from onnxprune.safety import active_transaction

__all__ = [
    "MIN_OPSET",
    "MAX_OPSET",
    "EXTERNAL_DATA_THRESHOLD",
    "load_model",
    "save_model",
    "default_output_path",
    "default_opset",
]

#: Lowest supported opset of the default ONNX domain.
MIN_OPSET = 9
#: Highest supported opset of the default ONNX domain.
MAX_OPSET = 21
#: Serialized size in bytes above which :func:`save_model` writes external data (1.8 GB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

_DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(model: onnx.ModelProto) -> int | None:
    """Return the opset version imported for the default ONNX domain, or None if absent."""
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            return int(imp.version)
    return None


def _all_tensors(graph: onnx.GraphProto):
    """Initializers and attribute tensors of ``graph`` and all its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model file, with its external data, and check it is supported.

    Args:
        path: path of a ``.onnx`` file. External data files are resolved relative
            to the folder that holds it.

    Returns:
        The loaded :class:`onnx.ModelProto` with all tensor data in memory.

    Raises:
        ModelLoadError: the file is missing, is a directory or anything but a regular file
            (a FIFO, a device), cannot be read, is not an ONNX model, is truncated/corrupt, or its external data is missing.
        UnsupportedModelError: IR version below 3, the default-domain opset is missing or outside
            ``MIN_OPSET..MAX_OPSET`` (9 to 21), or the graph has no input or no output.
    """
    data = read_user_file(path, ModelLoadError, "an ONNX file")
    p = Path(path)
    if not data:
        raise ModelLoadError(f"{p}: file is empty, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{p}: not an ONNX model or the file is corrupt/truncated ({first_line(exc)})") from exc
    # Protobuf parsing is lenient: random bytes sometimes parse into a nearly empty message.
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise ModelLoadError(f"{p}: not an ONNX model (no IR version, graph or opset import)")
    for tensor in _all_tensors(model.graph):
        if onnx.external_data_helper.uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if not location or not (p.parent / location).is_file():
                raise ModelLoadError(f"{p}: external data file {location or '?'} of tensor {tensor.name!r} is missing")
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
    except FileNotFoundError as exc:
        missing = exc.filename or first_line(exc)
        raise ModelLoadError(f"{p}: external data file {missing} is missing") from exc
    except (OSError, ValueError, RuntimeError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"{p}: cannot load external data ({first_line(exc)})") from exc

    if model.ir_version < 3:
        raise UnsupportedModelError(f"{p}: the input model is invalid: IR version {model.ir_version} cannot import "
                                    "opsets (IR 3 or later is needed)")
    opset = default_opset(model)
    if opset is None:
        raise UnsupportedModelError(f"{p}: the model imports no opset of the default ONNX domain")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedModelError(
            f"{p}: opset {opset} of the default domain is not supported ({MIN_OPSET} to {MAX_OPSET})"
        )
    init_names = {t.name for t in model.graph.initializer}
    if not [i for i in model.graph.input if i.name not in init_names]:
        raise UnsupportedModelError(f"{p}: the graph has no input")
    if not model.graph.output:
        raise UnsupportedModelError(f"{p}: the graph has no output")
    return model


def read_user_file(path: str | os.PathLike, error: type[Exception], kind: str) -> bytes:
    """The bytes of a file the user named, read only when it is a regular file, and never
    more than its size at open time (a growing file or a device cannot make it unbounded).

    Args:
        path: the file.
        error: the exception class raised (e.g. ModelLoadError, DataError).
        kind: what the file should be, for messages (``"an ONNX file"``).

    Raises:
        error: empty path, missing, a directory, not a regular file (FIFO, socket, device),
            no permission, or a read failure; the message names the file.
    """
    p = Path(path)
    if not str(path):
        raise error("the path is empty: give " + kind)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error(f"{p}: no such file") from None
    except OSError as exc:
        raise error(f"{p}: cannot be read ({exc.strerror or first_line(exc)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{p}: is a directory, not {kind}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{p}: is not a regular file (a FIFO, socket or device), not {kind}")
    try:
        with open(p, "rb") as fh:
            return fh.read(st.st_size)
    except OSError as exc:
        raise error(f"{p}: cannot be read ({exc.strerror or first_line(exc)})") from None


def default_output_path(input_path: str | os.PathLike) -> Path:
    """Return ``<stem>.pruned.onnx`` in the folder of ``input_path``.

    Example: ``models/resnet.onnx`` -> ``models/resnet.pruned.onnx``.

    Raises:
        ModelLoadError: ``input_path`` is empty or names no file (``''``, ``'/'``).
    """
    p = Path(input_path)
    if not str(input_path) or not p.name:
        raise ModelLoadError(f"{str(input_path)!r}: not a model file path")
    return p.with_name(f"{p.stem}.pruned.onnx")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return os.path.abspath(a) == os.path.abspath(b)


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically and return the resolved path.

    The model is serialized to a temporary file in the destination folder and then
    moved over ``path`` with :func:`os.replace`, so readers never see a half-written
    file. When the serialized model exceeds :data:`EXTERNAL_DATA_THRESHOLD` bytes
    (1.8 GB), its tensors go to ``<file name>.data`` beside it. ``model`` itself is
    not modified.

    Args:
        model: the model to write.
        path: destination ``.onnx`` path; its folder must exist.
        input_path: the model the user gave as input; writing over it is refused.

    Returns:
        The absolute path written.

    Raises:
        OutputPathError: ``path`` is the same file as ``input_path``, is a directory,
            its folder does not exist, or it cannot be written.
    """
    out = check_model_output(path, [input_path], clash="output path is the input model; refusing to overwrite it")
    folder = out.parent if str(out.parent) else Path(".")
    out = folder.resolve() / out.name

    try:  # encoded tensor by tensor: no whole-model buffer (and no whole-model ByteSize)
        encoding: _Encoding | None = _Encoding(model)
    except Exception:  # pragma: no cover - a message protobuf cannot size
        encoding = None
    size = encoding.size if encoding is not None else EXTERNAL_DATA_THRESHOLD + 1
    tmp_dir: str | None = None
    try:
        tmp_dir = tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
        tmp_model = Path(tmp_dir) / out.name
        if size > EXTERNAL_DATA_THRESHOLD:
            data_name = f"{out.name}.data"
            big = onnx.ModelProto()
            big.CopyFrom(model)
            onnx.external_data_helper.convert_model_to_external_data(
                big, all_tensors_to_one_file=True, location=data_name, size_threshold=1024
            )
            onnx.save_model(big, str(tmp_model))
            tmp_data = Path(tmp_dir) / data_name
            if tmp_data.exists():
                if active_transaction() is not None:
                    active_transaction().stage(tmp_data, folder / data_name)
                else:
                    os.replace(tmp_data, folder / data_name)
        else:
            with open(tmp_model, "wb") as fh:
                encoding.write(fh)
                fh.flush()
                os.fsync(fh.fileno())
        tx = active_transaction()
        if tx is not None:  # moved into place when the whole run succeeded
            tx.stage(tmp_model, out, scratch=Path(tmp_dir))
            tmp_dir = None
        else:
            os.replace(tmp_model, out)
    except OSError as exc:
        raise OutputPathError(f"{out}: cannot write ({exc.strerror or first_line(exc)})") from exc
    except ValueError as exc:
        raise OutputPathError(f"{out}: cannot serialize the model ({first_line(exc)})") from exc
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


#: protobuf tags (field number << 3 | wire type 2, length-delimited)
_MODEL_GRAPH_TAG = bytes([(7 << 3) | 2])  # ModelProto.graph
_GRAPH_INITIALIZER_TAG = bytes([(5 << 3) | 2])  # GraphProto.initializer


def _without(msg, skip: str):
    """A copy of protobuf message ``msg`` without field ``skip`` (other fields copied)."""
    from onnxprune.skeleton import copy_fields

    out = type(msg)()
    copy_fields(out, msg, skip)
    return out


_TENSOR_RAW_DATA_TAG = bytes([(9 << 3) | 2])  # TensorProto.raw_data


class _Encoding:
    """The protobuf encoding of a model, written tensor by tensor (:meth:`write`): the model
    without its graph, the graph field (tag, length), the graph without initializers, then
    each initializer as its own field, its ``raw_data`` last. Parsing gives a message equal to
    the model (field order differs from ``SerializeToString``; parsers accept any order).
    Only one tensor's bytes exist at a time; ``size`` is the encoded length in bytes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.head = _without(model, "graph").SerializeToString()
        self.graph = _without(model.graph, "initializer").SerializeToString() if model.HasField("graph") else None
        self.lengths = []  # per initializer: (encoded length, raw_data length or None)
        for t in model.graph.initializer:
            if t.HasField("raw_data"):
                raw = _raw_length(t)  # from dims and type when it can (no copy of the bytes)
                meta = _without(t, "raw_data").ByteSize()
                self.lengths.append((meta + 1 + len(_varint(raw)) + raw, raw))
            else:
                self.lengths.append((t.ByteSize(), None))
        body = 0 if self.graph is None else len(self.graph) + sum(1 + len(_varint(n)) + n for n, _ in self.lengths)
        self.body = body
        self.size = len(self.head) + (0 if self.graph is None else 1 + len(_varint(body)) + body)

    def write(self, fh) -> None:
        """Write the encoding to binary file ``fh``."""
        fh.write(self.head)
        if self.graph is None:
            return
        fh.write(_MODEL_GRAPH_TAG + _varint(self.body))
        fh.write(self.graph)
        for t, (n, raw) in zip(self.model.graph.initializer, self.lengths):
            fh.write(_GRAPH_INITIALIZER_TAG + _varint(n))
            if raw is None:
                fh.write(t.SerializeToString())
                continue
            data = t.raw_data
            if len(data) != raw:  # cannot happen: _raw_length checked the size it read off
                raise ValueError(f"tensor {t.name}: raw_data changed size while being written")
            fh.write(_without(t, "raw_data").SerializeToString())
            fh.write(_TENSOR_RAW_DATA_TAG + _varint(raw))
            fh.write(data)
            del data


_ITEMSIZE = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2,
             onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1,
             onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT32: 4,
             onnx.TensorProto.UINT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8,
             onnx.TensorProto.BOOL: 1}


def _raw_length(t) -> int:
    """Length of ``t.raw_data``: dims x item size for a tensor over this many bytes
    (reading ``raw_data`` copies the bytes out of upb's message; a big tensor is never
    stored short: checked at write, see :meth:`_Encoding.write`), else read off."""
    size = _ITEMSIZE.get(t.data_type)
    if size is not None:
        n = size
        for d in t.dims:
            n *= int(d)
        if n > 1 << 20:
            return n
    return len(t.raw_data)


def write_atomic(path: str | os.PathLike, writer) -> Path:
    """Write ``path`` atomically: ``writer(tmp)`` fills a temp file in the same folder
    (created with the umask's permissions, not mkstemp's 0600), then :func:`os.replace`
    (inside :func:`onnxprune.safety.staged_outputs`: at the end of the block, with the run's
    other outputs). Nothing is left behind on failure.

    Raises:
        OutputPathError: the folder does not exist or the file cannot be written.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputPathError(f"{path}: cannot write ({exc.strerror or first_line(exc)})") from exc
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 is for secrets, not reports
        os.close(fd)
        writer(tmp)
        tx = active_transaction()
        if tx is not None:  # moved into place when the whole run succeeded
            tx.stage(Path(tmp), path)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise OutputPathError(f"{path}: cannot write ({exc.strerror or first_line(exc)})") from exc
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and fsynced (:func:`write_atomic`).

    Raises:
        OutputPathError: the folder does not exist or the file cannot be written.
    """
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return write_atomic(path, write)


def check_side_output(path: str | os.PathLike, *, models: list[str | os.PathLike | None]) -> Path:
    """Check, before any work, that a report/plan path can be written and is no model file.

    Args:
        path: the side output (``--report``, ``--plan-out``, ``--json``).
        models: the input and output model paths it must not be.

    Raises:
        OutputPathError: ``path`` is one of ``models``, is a directory, or its folder does
            not exist.
    """
    return check_model_output(path, models, clash="a report/plan path must differ from the input and output model",
                              directory="is a directory")


def check_model_output(path: str | os.PathLike, inputs, *, clash: str | None = None,
                       directory: str = "output path is a directory") -> Path:
    """Check, before any work, that ``path`` may be written: it is none of ``inputs``, no
    directory, and its folder exists. Returns ``path`` (user-expanded).

    Args:
        path: the output.
        inputs: paths (or None) it must not be (the input models).
        clash / directory: the message after ``"<path>: "`` for each refusal (default
            wording names the clashing input).

    Raises:
        OutputPathError: ``path`` is empty, one of ``inputs``, a directory (or ends with
            ``/``), not a regular file, not writable, or its folder does not exist or is
            not writable.
    """
    raw = os.fspath(path)
    if not raw:
        raise OutputPathError("the output path is empty")
    p = Path(raw).expanduser()
    if raw.endswith(("/", os.sep)) and not p.is_dir():
        raise OutputPathError(f"{raw}: names a folder (trailing '/'), not a file; folder {p} does not exist")
    for m in inputs:
        if m is not None and str(m) and _same_file(p, Path(m).expanduser()):
            raise OutputPathError(f"{p}: " + (clash or f"output path is an input model ({m}); refusing to overwrite it"))
    try:
        st = os.stat(p)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputPathError(f"{p}: cannot be written ({exc.strerror or first_line(exc)})") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputPathError(f"{p}: {directory}")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputPathError(f"{p}: exists and is not a regular file (a FIFO, socket or device)")
    folder = p.parent if str(p.parent) else Path(".")
    try:
        folder_ok = folder.is_dir()
    except OSError:
        folder_ok = False
    if not folder_ok:
        raise OutputPathError(f"{p}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{p}: folder {folder} is not writable")
    if st is not None and not os.access(p, os.W_OK):
        raise OutputPathError(f"{p}: exists and is not writable")
    return p
