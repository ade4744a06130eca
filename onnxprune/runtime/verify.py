"""Verify a pruned model against the original one.

Rules this stage follows, in this order:

1. ``onnx.checker.check_model(pruned, full_check=True)`` must pass (models over the 2 GB
   protobuf limit are saved to a temporary directory with external data and checked by
   path). A checker failure is a :class:`~onnxprune.errors.VerificationError` carrying
   the checker's first line.
2. Both models must load into onnxruntime and run on the same random inputs
   (:func:`onnxprune.inputs.make_inputs`, seeded). Failures name the node when
   onnxruntime does. Sessions run the graph as written (graph optimisations off) so
   that errors name the model's own nodes; :mod:`onnxprune.runtime.latency` measures with full
   optimisation. Large weights are fed as inputs of a skeleton (:mod:`onnxprune.skeleton`),
   so no session serialises or copies them. With a masked oracle reference the original is
   loaded and its canonical form run, in one session with the oracle (see :func:`verify`).
3. The pruned model's graph inputs and outputs must carry the same names as the
   original's, and every output the same dtype and shape.
4. With a surgery oracle reference, the pruned model must compute what the original
   computes with the removed channels zeroed (:func:`check_oracle`, dtype-aware relative
   plus absolute tolerance); a mismatch is a :class:`~onnxprune.errors.VerificationError`.
5. The numeric difference per output (max absolute and relative error, cosine
   similarity, top-1 agreement for ``[N, classes]`` outputs) is recorded as
   information only: pruning is expected to change outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.errors import OnnxPruneError, UnsupportedModelError, VerificationError
from onnxprune.inputs import graph_inputs, make_inputs
from onnxprune.skeleton import lift_weights, skeleton
from onnxprune.surgery.oracle import MaskedReference

__all__ = [
    "OutputFidelity",
    "VerifyResult",
    "check_oracle",
    "compare_oracle",
    "check_providers",
    "make_session",
    "model_source",
    "oracle_tolerance",
    "ort_message",
    "run_model",
    "verify",
]

#: Largest serialised model handed to onnx/onnxruntime as bytes; larger ones go by path.
PROTOBUF_LIMIT = onnx.checker.MAXIMUM_PROTOBUF

Provider = Union[str, tuple[str, dict[str, Any]]]

# Where onnxruntime names the node that failed, in the formats it uses.
_NODE_PATTERNS = (
    re.compile(r"Name:'([^']*)'"),
    re.compile(r"\bNode \(([^)]*)\)"),
    re.compile(r"\bnode '([^']*)'"),
)
_SOURCE_LOCATION = re.compile(r"^\S+\.(?:cc|cpp|cu|h):\d+ [^(\s]+")
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*")


@dataclass(frozen=True)
class OutputFidelity:
    """Numeric difference of one output between the original (reference) and pruned model.

    ``max_rel_error`` is ``max|pruned - ref| / max|ref|`` (0 when both are all zeros,
    ``inf`` when only the reference is). ``cosine`` is computed on the flattened outputs
    in float64 (1.0 when both are all zeros). ``top1_agreement`` is the fraction of rows
    whose argmax agrees, for 2-D ``[N, classes]`` outputs only.
    """

    max_abs_error: float
    max_rel_error: float
    cosine: float
    top1_agreement: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`: the pruned model's output shapes and fidelity per output."""

    output_shapes: dict[str, tuple[int, ...]]
    fidelity: dict[str, OutputFidelity]
    oracle: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"output_shapes": {name: [dims]}, "outputs": {name: {...}}}``
        and, when the surgery oracle ran, ``"oracle": {"status": "passed", ...}``."""
        d = {
            "output_shapes": {k: list(v) for k, v in self.output_shapes.items()},
            "outputs": {k: v.to_dict() for k, v in self.fidelity.items()},
        }
        if self.oracle is not None:
            d["oracle"] = self.oracle
        return d


# --------------------------------------------------------------------------- sessions


def _provider_name(p: Provider) -> str:
    return p if isinstance(p, str) else p[0]


def check_providers(providers: Sequence[Provider]) -> None:
    """Raise :class:`OnnxPruneError` if a requested execution provider is not available."""
    if not providers:
        raise OnnxPruneError("no onnxruntime execution provider given")
    available = ort.get_available_providers()
    for p in providers:
        name = _provider_name(p)
        if name not in available:
            raise OnnxPruneError(
                f"onnxruntime execution provider {name!r} is not available; "
                f"available: {', '.join(available)}"
            )


@contextlib.contextmanager
def model_source(model: onnx.ModelProto | str | os.PathLike) -> Iterator[bytes | str]:
    """Yield what onnxruntime / the checker should read: bytes, or a path for big models.

    Paths are passed through. A ModelProto is serialised once; when that fails or gives
    :data:`PROTOBUF_LIMIT` bytes or more, it is copied (the caller's proto is left
    untouched) and saved with external data into a temporary directory that lives until
    the context exits.
    """
    if isinstance(model, (str, os.PathLike)):
        yield os.fspath(model)
        return
    try:
        data = model.SerializeToString()
    except Exception:  # over the protobuf limit: some implementations refuse to encode it
        data = None
    if data is not None and len(data) < PROTOBUF_LIMIT:
        yield data
        return
    del data
    with tempfile.TemporaryDirectory(prefix="onnxprune-") as tmp:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        path = os.path.join(tmp, "model.onnx")
        onnx.save_model(
            copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
            location="model.onnx.data", size_threshold=1024,
        )
        del copy
        yield path


def ort_message(exc: BaseException) -> str:
    """First line of an onnxruntime error, without the ``[ONNXRuntimeError] : n : CODE :`` prefix."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return _strip_source_location(_ORT_PREFIX.sub("", first))


def _strip_source_location(msg: str) -> str:
    """Drop a leading ``/path/file.cc:123 ns::Func(args...)`` that some ORT errors carry."""
    m = _SOURCE_LOCATION.match(msg)
    if not m:
        return msg
    depth, i = 0, m.end()
    while i < len(msg):
        if msg[i] == "(":
            depth += 1
        elif msg[i] == ")":
            depth -= 1
            if depth == 0:
                rest = msg[i + 1 :].strip()
                return rest or msg
        i += 1
    return msg


def _ort_node(exc: BaseException) -> str | None:
    text = str(exc)
    for pat in _NODE_PATTERNS:
        m = pat.search(text)
        if m and m.group(1):
            return m.group(1)
    return None


def _ort_error(exc: BaseException, what: str, label: str) -> VerificationError:
    node = _ort_node(exc)
    where = f" at node {node!r}" if node else ""
    return VerificationError(f"onnxruntime failed to {what} the {label}{where}: {ort_message(exc)}")


def make_session(
    source: bytes | str,
    providers: Sequence[Provider] = ("CPUExecutionProvider",),
    *,
    options: ort.SessionOptions | None = None,
    label: str = "model",
) -> ort.InferenceSession:
    """Create an InferenceSession; providers are checked first, ORT errors become VerificationError."""
    check_providers(providers)
    if options is None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 4  # failures are raised, not logged
    try:
        return ort.InferenceSession(source, sess_options=options, providers=list(providers))
    except Exception as exc:  # ORT raises its own Exception subclasses, ValueError, RuntimeError
        raise _ort_error(exc, "load", label) from exc


def _run_session(
    sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray], label: str
) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    missing = sorted(wanted - set(feeds))
    if missing:
        raise VerificationError(f"no input data for input {missing[0]!r} of the {label}")
    run_options = ort.RunOptions()
    run_options.log_severity_level = 4
    try:
        values = sess.run(names, {k: v for k, v in feeds.items() if k in wanted}, run_options)
    except Exception as exc:
        raise _ort_error(exc, "run", label) from exc
    return dict(zip(names, values))


def run_model(
    model: onnx.ModelProto | str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    providers: Sequence[Provider] = ("CPUExecutionProvider",),
    *,
    label: str = "model",
) -> dict[str, np.ndarray]:
    """Run ``model`` once in onnxruntime on ``feeds``; returns ``{output name: array}``.

    A ModelProto's large weights are fed as inputs of its skeleton
    (:func:`onnxprune.skeleton.lift_weights`): the session neither serialises nor copies
    them, and computes the same outputs. Feeds for inputs the model does not have are
    ignored; a missing feed, a load or a run failure raises :class:`VerificationError`.
    """
    weights: dict[str, np.ndarray] = {}
    if isinstance(model, onnx.ModelProto):
        try:
            lifted = lift_weights(model)
        except ValueError as exc:
            raise VerificationError(f"the {label} has a corrupt initializer: {exc}") from exc
        model, weights = lifted.model, lifted.weights
    with model_source(model) as source:
        sess = make_session(source, providers, label=label)
    return _run_session(sess, {**feeds, **weights}, label)


# ---------------------------------------------------------------------------- checks


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """The checker's message on one line. Its first line alone is often cut mid-sentence
    ("... input 'a' of node: " / "name: relu OpType: Relu"), so lines are joined."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _checker_error(model: onnx.ModelProto) -> BaseException | None:
    """The checker's exception for ``model`` (its skeleton: large weights as inputs of the
    same type and shape, :func:`onnxprune.skeleton.skeleton`, so they are not serialised;
    their bytes are checked when onnxruntime loads them), or None when it passes."""
    model = skeleton(model)[0]
    with model_source(model) as source:
        target = model if isinstance(source, bytes) else source
        try:
            onnx.checker.check_model(target, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            return exc
    return None


def _check(pruned: onnx.ModelProto, original: onnx.ModelProto | None = None) -> None:
    exc = _checker_error(pruned)
    if exc is None:
        return
    if original is not None:
        orig_exc = _checker_error(original)
        if orig_exc is not None:  # not onnxprune's doing: say so
            raise UnsupportedModelError(f"the input model is invalid: it fails the ONNX checker "
                                        f"({_one_line(orig_exc)})") from orig_exc
    raise VerificationError(f"pruned model fails the ONNX checker: {_one_line(exc)}") from exc


#: relative part of the oracle tolerance, per output dtype: ``max|pruned - oracle|`` may reach
#: this fraction of ``max|oracle|`` (rounding of a narrower versus a masked computation)
ORACLE_TOLERANCE = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 1e-4, np.dtype(np.float16): 1e-2}
BF16_TOLERANCE = 5e-2
#: absolute part of the oracle tolerance, per output dtype, added to the relative part. A
#: saturating activation is accurate to an absolute error, not a relative one: onnxruntime's
#: CPU Sigmoid is within 1.7e-7 of the exact value and returns multiples of
#: 2**-25 near 0, so an output that is all ~1e-7 (a detector's probability map on random
#: inputs) differs by 100% relative between two runs whose logits differ by one rounding.
#: The floor is about 8 units in the last place at 1.0 (float16, bfloat16: one).
ORACLE_ABS_TOLERANCE = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-6, np.dtype(np.float16): 1e-3}
BF16_ABS_TOLERANCE = 1e-2


def _oracle_diff(ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    """``(max|out - ref|, max|ref|)`` over finite values; the difference is inf when non-finite
    values disagree, and 0 when ``ref`` has no finite value."""
    r = np.asarray(ref, dtype=np.float64)
    o = np.asarray(out, dtype=np.float64)
    fin = np.isfinite(r)
    same_nonfinite = np.array_equal(np.isnan(r), np.isnan(o)) and np.array_equal(r[np.isinf(r)], o[np.isinf(r)])
    if not same_nonfinite or not np.isfinite(o[fin]).all():
        return float("inf"), float(np.abs(r[fin]).max()) if fin.any() else 0.0
    if not fin.any():
        return 0.0, 0.0
    return float(np.abs(o[fin] - r[fin]).max()), float(np.abs(r[fin]).max())


def _oracle_error(ref: np.ndarray, out: np.ndarray) -> float:
    """``max|out - ref| / max|ref|`` over finite values (inf when non-finite ones disagree)."""
    diff, scale = _oracle_diff(ref, out)
    if diff == 0:
        return 0.0
    return diff / scale if scale > 0 else float("inf")


def oracle_tolerance(dtype: np.dtype) -> tuple[float, float]:
    """``(relative, absolute)`` oracle tolerance of an output dtype: an output passes when
    ``max|pruned - oracle| <= relative * max|oracle| + absolute``."""
    if dtype.name == "bfloat16":
        return BF16_TOLERANCE, BF16_ABS_TOLERANCE
    return ORACLE_TOLERANCE.get(dtype, 1e-4), ORACLE_ABS_TOLERANCE.get(dtype, 1e-6)


def check_oracle(reference: onnx.ModelProto, out: Mapping[str, np.ndarray], feeds: Mapping[str, np.ndarray],
                 providers: Sequence[Provider] = ("CPUExecutionProvider",)) -> dict[str, Any]:
    """Compare the pruned model's outputs ``out`` with the surgery oracle ``reference`` (the
    original with removed channels zeroed, :func:`onnxprune.surgery.oracle.zeroed_reference`)
    run on the same ``feeds``.

    Every float output must satisfy ``max|pruned - oracle| <= rel * max|oracle| + abs``
    (:func:`oracle_tolerance`: 1e-4 and 1e-6 for float32, 1e-2 and 1e-3 for float16). The
    relative part covers rounding differences between the narrower and the masked
    computation; the absolute part covers outputs whose values are as small as the runtime's
    absolute accuracy (a saturated Sigmoid: see :data:`ORACLE_ABS_TOLERANCE`), where a
    relative error measures rounding only. Integer and bool outputs are not compared.

    Returns:
        ``{"status": "passed", "inputs": "random", "max_rel_error": {output: error},
        "max_abs_error": {output: error}, "tolerance": {output: rel}, "abs_tolerance":
        {output: abs}}``.

    Raises:
        VerificationError: an output differs by more than its tolerance (the surgery is
            wrong), one line naming the output and its error.
    """
    return compare_oracle(run_model(reference, feeds, providers, label="surgery oracle"), out)


def compare_oracle(ref: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """:func:`check_oracle` on outputs already computed: ``ref`` of the oracle, ``out`` of the
    pruned model (``{output name: array}`` each). Same result and errors."""
    errors: dict[str, float] = {}
    abs_errors: dict[str, float] = {}
    tols: dict[str, float] = {}
    abs_tols: dict[str, float] = {}
    for name, o in out.items():
        r = ref.get(name)
        if r is None or not (np.issubdtype(o.dtype, np.floating) or o.dtype.name == "bfloat16"):
            continue
        tol, atol = oracle_tolerance(o.dtype)
        diff, scale = _oracle_diff(r, o)
        errors[name], abs_errors[name] = _oracle_error(r, o), diff
        tols[name], abs_tols[name] = tol, atol
        if not diff <= tol * scale + atol:
            raise VerificationError(
                f"surgery oracle: output {name!r} of the pruned model differs from the original with the removed "
                f"channels zeroed: max abs error {diff:.3g} > {tol:g} x max|ref| {scale:.3g} + {atol:g} "
                f"(max relative error {errors[name]:.3g})")
    return {"status": "passed", "inputs": "random", "max_rel_error": errors, "max_abs_error": abs_errors,
            "tolerance": tols, "abs_tolerance": abs_tols}


def _compare_names(kind: str, orig: list[str], pruned: list[str]) -> None:
    if orig == pruned:
        return
    for name in orig:
        if name not in pruned:
            raise VerificationError(f"pruned model lacks {kind} {name!r} of the original")
    for name in pruned:
        if name not in orig:
            raise VerificationError(f"pruned model has {kind} {name!r} that the original lacks")
    raise VerificationError(
        f"pruned model's {kind}s are in a different order: {pruned} instead of {orig}"
    )


def _fidelity(ref: np.ndarray, out: np.ndarray) -> OutputFidelity:
    r = np.asarray(ref, dtype=np.float64).ravel()
    o = np.asarray(out, dtype=np.float64).ravel()
    if r.size == 0:
        return OutputFidelity(0.0, 0.0, 1.0, None)
    diff = np.abs(o - r)
    max_abs = float(diff.max())
    scale = float(np.abs(r).max())
    if scale > 0:
        max_rel = max_abs / scale
    else:
        max_rel = 0.0 if max_abs == 0 else float("inf")
    nr, no = float(np.linalg.norm(r)), float(np.linalg.norm(o))
    if nr == 0 and no == 0:
        cosine = 1.0
    elif nr == 0 or no == 0:
        cosine = 0.0
    else:
        cosine = float(np.clip(np.dot(r, o) / (nr * no), -1.0, 1.0))
    top1 = None
    if ref.ndim == 2 and ref.shape[0] > 0 and ref.shape[1] > 1:
        top1 = float(np.mean(np.argmax(ref, axis=1) == np.argmax(out, axis=1)))
    return OutputFidelity(max_abs, max_rel, cosine, top1)


def verify(
    pruned: onnx.ModelProto,
    original: onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]],
    *,
    seed: int = 0,
    providers: Sequence[Provider] = ("CPUExecutionProvider",),
    reference: onnx.ModelProto | MaskedReference | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
) -> VerifyResult:
    """Check ``pruned``, run it and ``original`` on the same random inputs, compare outputs.

    ``feeds`` replaces the random inputs (e.g. a batch of calibration data, on which the
    oracle is a stricter check than on random inputs that saturate a detector's output).

    ``input_shapes`` gives the concrete shape of every graph input (see
    :func:`onnxprune.inputs.resolve_input_shapes`). Raises :class:`VerificationError`
    when the pruned model fails the checker, does not run, or an output's name, dtype
    or shape differs; :class:`OnnxPruneError` when a provider is not available;
    :class:`UnsupportedModelError` when the *original* fails the checker too (the input is
    invalid, not the surgery).

    With ``reference`` (the surgery oracle: the canonical original with the removed channels
    zeroed, :func:`onnxprune.surgery.oracle.zeroed_reference`), the pruned model's outputs
    must also equal the reference's on the same inputs (:func:`check_oracle`, which raises
    :class:`VerificationError` when they differ); the result is :attr:`VerifyResult.oracle`.
    With a :class:`~onnxprune.surgery.oracle.MaskedReference` (built from the canonical
    original) one session runs it twice: all-ones masks give the original's outputs (its
    canonical form computes what it computes, so ``original`` itself is only loaded, as a
    skeleton, to check that onnxruntime accepts it) and the plan's masks the oracle's.
    """
    check_providers(providers)
    _check(pruned, original)
    _compare_names(
        "input", [i.name for i in graph_inputs(original)], [i.name for i in graph_inputs(pruned)]
    )
    _compare_names(
        "output", [o.name for o in original.graph.output], [o.name for o in pruned.graph.output]
    )

    if feeds is None:
        feeds = make_inputs(original, dict(input_shapes), seed=seed)
    oracle_out = None
    if isinstance(reference, MaskedReference):  # the original is not run: check that it loads
        with model_source(skeleton(original)[0]) as source:
            make_session(source, providers, label="original model")
    out = run_model(pruned, feeds, providers, label="pruned model")  # its weights are freed after the run
    if isinstance(reference, MaskedReference):  # one session: the original, then the oracle
        with model_source(reference.model) as source:
            sess = make_session(source, providers, label="original model")
        try:
            weights = reference.weights()
        except ValueError as exc:
            raise VerificationError(f"the original model has a corrupt initializer: {exc}") from exc
        ref = _run_session(sess, {**feeds, **reference.feeds(False, weights)}, "original model")
        oracle_out = _run_session(sess, {**feeds, **reference.feeds(True, weights)}, "surgery oracle")
        del sess, weights
    else:
        ref = run_model(original, feeds, providers, label="original model")

    shapes: dict[str, tuple[int, ...]] = {}
    fidelity: dict[str, OutputFidelity] = {}
    for name, r in ref.items():
        o = out[name]
        if r.dtype != o.dtype:
            raise VerificationError(
                f"output {name!r} has dtype {o.dtype} in the pruned model, {r.dtype} in the original"
            )
        if r.shape != o.shape:
            raise VerificationError(
                f"output {name!r} has shape {list(o.shape)} in the pruned model, "
                f"{list(r.shape)} in the original"
            )
        shapes[name] = tuple(int(d) for d in o.shape)
        fidelity[name] = _fidelity(r, o)
    oracle = None
    if oracle_out is not None:
        oracle = compare_oracle(oracle_out, out)
    elif reference is not None:
        oracle = check_oracle(reference, out, feeds, providers)
    return VerifyResult(output_shapes=shapes, fidelity=fidelity, oracle=oracle)
