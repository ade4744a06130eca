"""Fuzz corpus (issue 11): every command on bad, odd and valid-but-unusual inputs.

Each case asserts: the exit code; on failure exactly one non-empty stderr line, starting
``error:``, and no traceback; on success no ``error:`` line, no traceback and no warning;
the sha256 of every corpus file unchanged; no file left in the output folder but the
outputs a success names, none in $TMPDIR; for a successful compress, a checker-valid model
that onnxruntime runs with the original's output names, shapes and dtypes, and the
surgery oracle passed (from the report).

Most cases run in-process with click's CliRunner (fast); cases that could hang (FIFOs,
devices), allocate without bound or need a real signal run in a subprocess under a
timeout and an address-space limit (``resource.setrlimit``). :func:`test_corpus_figures`
prints the totals the README quotes.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from fuzz_corpus import corpus_hashes, write_corpus
from onnxprune.cli import main
from tiny_models import ALL_BUILDERS

REPO = Path(__file__).resolve().parents[1]
#: wall-clock limit of one subprocess case (a hang fails the case, it never blocks CI)
CASE_TIMEOUT_S = 120
#: address-space limit of one subprocess case
CASE_MEMORY_BYTES = 6 << 30


@dataclass(frozen=True)
class Case:
    """One run: ``argv`` with ``{key}`` placeholders for corpus files, ``{out}`` for the
    output folder; ``expect`` is ``ok``, ``error`` or ``interrupt``; ``fragment`` must be
    in the error line; ``proc`` runs it in a subprocess."""

    id: str
    argv: tuple[str, ...]
    expect: str
    fragment: str = ""
    proc: bool = False
    kill: str | None = None  # subprocess: "SIGINT@startup", "SIGTERM@<module>:<attr>"


def _c(id: str, argv: str, expect: str = "error", fragment: str = "", **kw) -> Case:
    return Case(id, tuple(argv.split()), expect, fragment, **kw)


NO = "--no-bench"


def _cases() -> list[Case]:
    cases: list[Case] = []
    add = cases.append
    # ---- valid models, data-free (and the unusual ones)
    for name in sorted(ALL_BUILDERS):
        add(_c(f"ok-{name}", f"compress {{{name}}} -o {{out}}/p.onnx --target-macs 0.5 {NO}", "ok"))
    for name in ("if_outer", "if_inner", "fp16_cast", "fp16_all", "dynamic", "ir3", "consts", "inf_weight", "ext_ok", "mnist"):
        add(_c(f"ok-{name}", f"compress {{{name}}} -o {{out}}/p.onnx {NO}", "ok"))
    for crit in ("l2", "bn", "cpmc", "random"):
        add(_c(f"ok-crit-{crit}", f"compress {{chain}} -o {{out}}/p.onnx --criterion {crit} {NO}", "ok"))
    for opt in ("--ratio 0.3", "--target-params 0.6", "--scope layer", "--round-to 4", "--max-layer-ratio 0.2",
                "--exclude conv*", "--seed 7", "--input-shape x:1,3,16,16", "--max-memory 64M",
                "--target-macs 0.01", "--report {out}/r.json --plan-out {out}/plan.json"):
        add(_c(f"ok-opt-{opt.split()[0][2:]}-{len(cases)}", f"compress {{residual}} -o {{out}}/p.onnx {opt} {NO}", "ok"))
    add(_c("ok-dynamic-shape", f"compress {{dynamic}} -o {{out}}/p.onnx --input-shape x:1,3,24,20 {NO}", "ok"))
    add(_c("ok-bench-small", "compress {chain} -o {out}/p.onnx --bench-repeat 2", "ok"))
    add(_c("ok-taylor", f"compress {{chain}} -o {{out}}/p.onnx --criterion taylor --data {{data/unlabelled.npz}} {NO}", "ok"))
    add(_c("ok-recal", f"compress {{chain}} -o {{out}}/p.onnx --data {{data/unlabelled.npz}} --recalibrate-bn {NO}", "ok"))
    add(_c("ok-analyze", "analyze {residual} --json {out}/a.json", "ok"))
    add(_c("ok-analyze-if", "analyze {if_outer} -v", "ok"))
    add(_c("ok-analyze-dup", "analyze {dup_names}", "ok"))  # analysis renames nodes; compress refuses it (below)
    add(_c("ok-bench", "bench {chain} --repeat 2 --warmup 0 --provider cpu --report {out}/b.json", "ok"))
    add(_c("ok-eval", "eval {chain} --data {data/good.npz}", "ok"))
    add(_c("ok-help", "compress --help", "ok"))
    # ---- not a model / broken ONNX
    for key, frag in (("empty", "empty"), ("text", "not an onnx"), ("random_bytes", "onnx"),
                      ("truncated", "random_bytes" and ""), ("truncated_tiny", ""), ("zeros", ""),
                      ("npz_as_model", ""), ("a_folder", "directory"), ("no_graph", ""), ("no_input", "no input"),
                      ("no_output", "no output"), ("opset8", "opset 8"), ("opset30", "opset 30"),
                      ("ir2", "input model is invalid"), ("cycle", ""), ("bad_init", ""), ("f64_all", ""),
                      ("bf16_all", "bfloat16"), ("data/good.npz", ""), ("dup_names", "original model"),
                      ("unknown_op", "NoSuchOp"), ("custom_domain", "com.example")):
        for cmd in ("compress", "analyze"):
            if cmd == "analyze" and key == "dup_names":
                continue  # analysis needs no session of the original: a success above
            add(_c(f"bad-{cmd}-{key}", f"{cmd} {{{key}}} -o {{out}}/p.onnx" if cmd == "compress" else f"{cmd} {{{key}}}",
                   "error", frag))
    add(_c("bad-missing", "compress {out}/nope.onnx -o {out}/p.onnx", "error", "no such file"))
    add(_c("bad-empty-path", "compress -o {out}/p.onnx", "error"))
    add(Case("bad-empty-string", ("compress", "", "-o", "{out}/p.onnx"), "error", "empty"))
    add(Case("bad-empty-string-default-out", ("compress", ""), "error"))
    add(_c("bad-bench-missing", "bench {out}/nope.onnx", "error", "nope.onnx"))
    add(_c("bad-bench-text", "bench {text}", "error"))
    add(_c("bad-eval-text", "eval {text} --data {data/good.npz}", "error"))
    add(_c("bad-finetune-text", "finetune {text} --data {data/good.npz} -o {out}/f.onnx", "error"))
    # ---- external data attacks
    for key in ("ext_missing", "ext_parent", "ext_abs", "ext_short", "ext_offset", "ext_length", "ext_dir", "ext_neg"):
        add(_c(f"ext-{key}", f"compress {{{key}}} -o {{out}}/p.onnx {NO}", "error"))
        add(_c(f"ext-analyze-{key}", f"analyze {{{key}}}", "error"))
    # ---- sizes (class 1)
    add(_c("size-dim-1e9", f"compress {{dim_1e9}} -o {{out}}/p.onnx {NO}", "error", "memory budget", proc=True))
    add(_c("size-dim-1e9-analyze", "analyze {dim_1e9}", "error", "memory budget", proc=True))
    add(_c("size-dim-1e9-bench", "bench {dim_1e9}", "error", "1000000000", proc=True))
    add(_c("size-huge-hw", "analyze {dim_huge_hw}", "error", "memory budget"))
    for spec, frag in (("x:99999999999999999999,3,16,16", "memory budget"), ("x:1,3,100000,100000", ""),
                       ("x", "expected name"), ("x:a,b", "not an integer"), ("x:0,3,16,16", "positive"),
                       ("x:-1,3,16,16", "positive"), ("q:1,3,16,16", "'q'"), ("x:1,3", "rank"), (":1,3,16,16", "empty")):
        add(_c(f"size-shape-{len(cases)}", f"compress {{chain}} -o {{out}}/p.onnx --input-shape {spec} {NO}", "error", frag))
    add(_c("size-shape-dyn-huge", f"compress {{dynamic}} -o {{out}}/p.onnx --input-shape x:1,3,60000,60000 {NO}",
           "error", "memory budget"))
    add(_c("size-max-memory-tiny", f"compress {{chain}} -o {{out}}/p.onnx --max-memory 1K {NO}", "error", "budget"))
    for v in ("abc", "0", "-5G", "1Q"):
        add(_c(f"size-max-memory-{v}", f"compress {{chain}} -o {{out}}/p.onnx --max-memory {v} {NO}", "error", "max-memory"))
    img = "--data {data/images}"
    for opt, frag in (("--image-size 0,-3", "image-size"), ("--image-size 200000,200000", "memory budget"),
                      ("--image-size 16", "image-size"), ("--image-size a,b", "image-size"),
                      ("--image-size 16,16 --mean 1,2", "--mean"), ("--image-size 16,16 --std 1,2,3,4", "--std"),
                      ("--image-size 16,16 --std 0", "--std"), ("--image-size 16,16 --mean nan", "--mean"),
                      ("--image-size 16,16 --scale 0", "--scale"), ("", "image-size")):
        add(_c(f"size-img-{len(cases)}", f"compress {{chain}} -o {{out}}/p.onnx --criterion taylor {img} {opt} {NO}",
               "error", frag))
    for opt, frag in (("--seed -1", "--seed"), ("--seed 99999999999", "--seed"), ("--samples 0", "samples"),
                      ("--samples -3", "samples"), ("--batch-size 0", "batch"), ("--batch-size -1", "batch")):
        add(_c(f"size-{len(cases)}", f"compress {{chain}} -o {{out}}/p.onnx --criterion taylor --data {{data/unlabelled.npz}} "
               f"{opt} {NO}", "error", frag))
    add(_c("size-npy-header", f"compress {{chain}} -o {{out}}/p.onnx --criterion taylor --data {{data/huge_header.npy}} {NO}",
           "error", "truncated"))  # a .npy is memory-mapped: its header must fit the file, not the memory
    add(_c("size-npz-header", f"compress {{chain}} -o {{out}}/p.onnx --criterion taylor --data {{data/huge_header.npz}} {NO}",
           "error", "memory budget"))
    # ---- data files (class 2)
    for key, frag in (("truncated.npz", "truncated.npz"), ("garbage.npz", "garbage.npz"), ("no_x.npz", "'x'"),
                      ("nan.npz", "nan"), ("int.npz", "dtype"), ("wrong_shape.npz", "shape"),
                      ("bad_labels.npz", "y has shape"), ("object.npy", "object.npy"), ("text.npy", "text.npy"),
                      ("data.csv", ".npz"), ("broken_images", "bad.png"), ("empty_folder", "no images")):
        size = " --image-size 16,16" if key.endswith(("images", "folder")) else ""
        if key == "broken_images":
            size += " --strict-data"  # without it the bad image is skipped (tests/test_streaming.py)
        add(_c(f"data-{key}", f"compress {{chain}} -o {{out}}/p.onnx --criterion taylor --data {{data/{key}}}{size} {NO}",
               "error", frag))
        if key in ("truncated.npz", "garbage.npz", "object.npy"):
            add(_c(f"data-eval-{key}", f"eval {{chain}} --data {{data/{key}}}", "error", key))
    add(_c("data-missing", f"compress {{chain}} -o {{out}}/p.onnx --criterion taylor --data {{out}}/none.npz {NO}",
           "error", "none.npz"))
    add(_c("data-needed", f"compress {{chain}} -o {{out}}/p.onnx --criterion taylor {NO}", "error", "--data"))
    # ---- bad options (class 5)
    for opt, frag in (("--target-macs abc", "--target-macs"), ("--target-macs -1", ""), ("--target-macs 0", ""),
                      ("--target-macs 1.5", ""), ("--ratio 1.0", ""), ("--ratio -0.5", ""), ("--criterion foo", "--criterion"),
                      ("--round-to 0", "--round-to"), ("--round-to x", "--round-to"), ("--max-layer-ratio 2", ""),
                      ("--ratio 0.3 --target-macs 0.5", "only one"), ("--bogus", "--bogus"), ("--provider foo", "foo"),
                      ("--threads 0", "threads"), ("--bench-repeat 0", "repeat"), ("--scope diagonal", "--scope"),
                      ("--target-macs 0.01 --strict-target --exclude conv1", ""), ("--loss foo", "--loss"),
                      ("--finetune-epochs -1 --data {data/good.npz}", "epochs"),
                      ("--finetune-lr abc", "--finetune-lr"), ("--recalibrate-bn", "--data"),
                      ("--target-macs nan", ""), ("--target-macs inf", ""), ("--cpmc-a nan --criterion cpmc", "")):
        add(_c(f"opt-{len(cases)}", f"compress {{chain}} -o {{out}}/p.onnx {opt} {NO}", "error", frag))
    add(_c("opt-no-command", "frobnicate", "error", "frobnicate"))
    add(_c("opt-missing-arg", "compress", "error", "MODEL"))
    add(_c("opt-bench-batch", "bench {chain} --batch 0", "error", "--batch"))
    add(_c("opt-bench-repeat", "bench {chain} --repeat 0", "error", "repeat"))
    add(_c("opt-analyze-shape", "analyze {chain} --input-shape x:1,3", "error", "rank"))
    # ---- outputs (class 4)
    add(_c("out-is-input", f"compress {{chain}} -o {{chain}} {NO}", "error", "input"))
    add(_c("out-is-dir", f"compress {{chain}} -o {{out}} {NO}", "error", "directory"))
    add(_c("out-trailing-slash", f"compress {{chain}} -o {{out}}/newdir/ {NO}", "error", "newdir"))
    add(_c("out-no-folder", f"compress {{chain}} -o {{out}}/a/b/p.onnx {NO}", "error", "does not exist"))
    add(_c("out-under-file", f"compress {{chain}} -o {{chain}}/p.onnx {NO}", "error"))
    add(_c("out-report-dir", f"compress {{chain}} -o {{out}}/p.onnx --report {{out}} {NO}", "error", "directory"))
    add(_c("out-report-is-output", f"compress {{chain}} -o {{out}}/p.onnx --report {{out}}/p.onnx {NO}", "error"))
    add(_c("out-report-is-input", f"compress {{chain}} -o {{out}}/p.onnx --report {{chain}} {NO}", "error"))
    add(_c("out-plan-no-folder", f"compress {{chain}} -o {{out}}/p.onnx --plan-out {{out}}/x/plan.json {NO}", "error"))
    add(_c("out-json-dir", "analyze {chain} --json {out}", "error", "directory"))
    add(_c("out-bench-report-is-model", "bench {chain} --report {chain}", "error"))
    add(_c("out-finetune-is-input", "finetune {chain} --data {data/good.npz} -o {chain}", "error", "input"))
    add(_c("out-dev-null-report", f"compress {{chain}} -o {{out}}/p.onnx --report /dev/null {NO}", "error",
           "not a regular file"))
    # ---- paths that hang or read without bound (class 3): subprocesses
    add(_c("path-dev-zero", "compress /dev/zero -o {out}/p.onnx", "error", "not a regular file", proc=True))
    add(_c("path-fifo", "compress {out}/fifo.onnx -o {out}/p.onnx", "error", "not a regular file", proc=True))
    add(_c("path-fifo-data", f"compress {{chain}} -o {{out}}/p.onnx --criterion taylor --data {{out}}/fifo.npz {NO}",
           "error", "not a regular file", proc=True))
    # ---- interruptions (class 6): real signals in subprocesses
    add(_c("int-startup-SIGINT", f"compress {{chain}} -o {{out}}/p.onnx {NO}", "interrupt", proc=True,
           kill="SIGINT@startup"))
    add(_c("int-startup-SIGTERM", f"compress {{chain}} -o {{out}}/p.onnx {NO}", "interrupt", proc=True,
           kill="SIGTERM@startup"))
    add(_c("int-score-SIGINT", f"compress {{chain}} -o {{out}}/p.onnx {NO}", "interrupt", proc=True,
           kill="SIGINT@onnxprune.criteria.magnitude:L1.score"))
    add(_c("int-taylor-SIGTERM", f"compress {{chain}} -o {{out}}/p.onnx --criterion taylor --data {{data/good.npz}} {NO}",
           "interrupt", proc=True, kill="SIGTERM@onnxprune.criteria.taylor:Taylor.score_with_data"))
    add(_c("int-finetune-SIGTERM", f"compress {{chain}} -o {{out}}/p.onnx --data {{data/good.npz}} --finetune-epochs 1 "
           f"--report {{out}}/r.json {NO}", "interrupt", proc=True, kill="SIGTERM@onnxprune.recover:finetune"))
    add(_c("int-write-SIGINT", f"compress {{chain}} -o {{out}}/p.onnx --report {{out}}/r.json {NO}", "interrupt",
           proc=True, kill="SIGINT@os:fsync"))
    add(_c("int-write-SIGTERM", f"compress {{chain}} -o {{out}}/p.onnx --plan-out {{out}}/plan.json {NO}", "interrupt",
           proc=True, kill="SIGTERM@os:fsync"))
    return cases


CASES = _cases()


# ----------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, Path], dict[str, str]]:
    root = tmp_path_factory.mktemp("corpus")
    files = write_corpus(root)
    return root, files, corpus_hashes(root)


RESULTS: list[dict] = []


def _argv(case: Case, files: dict[str, Path], out: Path) -> list[str]:
    subs = {f"{{{k}}}": str(v) for k, v in files.items()}
    subs["{out}"] = str(out)
    args = []
    for a in case.argv:
        for k, v in sorted(subs.items(), key=lambda kv: -len(kv[0])):
            a = a.replace(k, v)
        args.append(a)
    return args


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CASE_MEMORY_BYTES, CASE_MEMORY_BYTES))


_KILL_WRAPPER = """
import importlib, os, signal, sys
from onnxprune.entry import main
sig = getattr(signal, sys.argv[1]); mod, attr = sys.argv[2].split(":")
owner = importlib.import_module(mod)
*path, name = attr.split(".")
for p in path:
    owner = getattr(owner, p)
orig = getattr(owner, name)
def hooked(*a, **k):
    os.kill(os.getpid(), sig)
    return orig(*a, **k)
setattr(owner, name, hooked if not path else hooked)
sys.argv = ["onnxprune"] + sys.argv[3:]
main()
"""


def _caught(pid: int, signals: tuple[int, ...]) -> bool:
    """True when process ``pid`` has handlers installed for all ``signals`` (Linux)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("SigCgt:")), 16)
    return all(mask >> (s - 1) & 1 for s in signals)


def _run_proc(case: Case, args: list[str], env: dict[str, str]) -> tuple[int, str, bool]:
    """(exit code, stderr, hung) of a subprocess case."""
    if case.kill and not case.kill.endswith("@startup"):
        sig, target = case.kill.split("@")
        cmd = [sys.executable, "-c", _KILL_WRAPPER, sig, target, *args]
    else:
        cmd = [sys.executable, "-m", "onnxprune", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=_limits,
                            cwd=REPO)
    if case.kill and case.kill.endswith("@startup"):
        sig = getattr(signal, case.kill.split("@")[0])
        while proc.poll() is None and not _caught(proc.pid, (signal.SIGINT, signal.SIGTERM)):
            time.sleep(0.002)
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=CASE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return proc.returncode, err.decode(errors="replace"), True
    return proc.returncode, err.decode(errors="replace"), False


def _run_inproc(args: list[str], tmp: Path, monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    result = CliRunner().invoke(main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(result.exception))
        return 1, result.stderr + "\nTraceback (in-process)\n" + tb
    return result.exit_code, result.stderr


def _tmp_left(tmp: Path) -> list[str]:
    """What a run left in its $TMPDIR, but onnxruntime's own ``.ses`` (written by ``import
    onnxruntime`` itself, the same file for every process)."""
    return sorted(set(os.listdir(tmp)) - {".ses"})


def _check_success(args: list[str], files: dict[str, Path], out: Path) -> str:
    """The compress output is checker-valid, runs like the original; the oracle passed."""
    if args[0] != "compress" or "--help" in args:
        return "n/a"
    src = Path(args[1])
    dest = out / "p.onnx"
    onnx.checker.check_model(str(dest), full_check=True)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    a = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(dest), so, providers=["CPUExecutionProvider"])
    shapes = {}
    for i, spec in enumerate(args):
        if spec == "--input-shape":
            name, dims = args[i + 1].rsplit(":", 1)
            shapes[name] = [int(d) for d in dims.split(",")]
    feeds = {}
    for inp in a.get_inputs():
        dims = shapes.get(inp.name) or [d if isinstance(d, int) and d > 0 else (1 if j == 0 else 16)
                                        for j, d in enumerate(inp.shape)]
        dtype = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(inp.type, np.float32)
        feeds[inp.name] = np.random.default_rng(0).standard_normal(dims).astype(dtype)
    names = [o.name for o in a.get_outputs()]
    assert names == [o.name for o in b.get_outputs()]
    ra, rb = a.run(names, feeds), b.run(names, feeds)
    for n, x, y in zip(names, ra, rb):
        assert x.shape == y.shape and x.dtype == y.dtype, (n, x.shape, y.shape, x.dtype, y.dtype)
    assert dest.stat().st_size <= src.stat().st_size * 1.05 + 4096, "pruned model bigger than its input"
    report = out / "r.json"
    if report.exists():
        oracle = json.loads(report.read_text())["fidelity"].get("oracle")
        assert oracle and oracle["status"] == "passed", oracle
        return "passed"
    return "checked"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, corpus, tmp_path: Path, monkeypatch) -> None:
    root, files, hashes = corpus
    out = tmp_path / "out"
    out.mkdir()
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    if "fifo" in case.id:
        os.mkfifo(out / ("fifo.npz" if "data" in case.id else "fifo.onnx"))
    args = _argv(case, files, out)
    if case.expect == "ok" and args[0] == "compress" and "--report" not in args:
        args += ["--report", str(out / "r.json")]
    before = set(os.listdir(out))
    if case.proc:
        env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
        code, err, hung = _run_proc(case, args, env)
    else:
        code, err = _run_inproc(args, tmp, monkeypatch)
        hung = False
    row = {"id": case.id, "expect": case.expect, "code": code, "hung": hung, "traceback": "Traceback" in err}
    RESULTS.append(row)
    assert not hung, f"{case.id}: no answer within {CASE_TIMEOUT_S} s"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if case.expect == "ok":
        assert code == 0, err
        assert not [ln for ln in lines if ln.startswith("error") or "Warning" in ln], err
    else:
        assert code == (130 if case.expect == "interrupt" else 2), (code, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert case.fragment.lower() in lines[0].lower(), (case.fragment, lines[0])
    modified = [p for p, digest in hashes.items() if corpus_hashes(Path(p).parent).get(p) != digest]
    row["modified"] = len(modified)
    assert not modified, modified
    left = sorted(set(os.listdir(out)) - before)
    written = {Path(a).name for i, a in enumerate(args) if i and args[i - 1] in ("-o", "--output", "--report",
                                                                                   "--plan-out", "--json")}
    expected = written if case.expect == "ok" else set()
    row["leftover"] = len(set(left) - expected) + len(_tmp_left(tmp))
    assert set(left) <= expected and (case.expect != "ok" or args[0] != "compress" or "p.onnx" in left
                                      or "--help" in args), left
    assert not _tmp_left(tmp), _tmp_left(tmp)
    if case.expect == "ok":
        row["oracle"] = _check_success(args, files, out)


def test_corpus_size_and_figures() -> None:
    """At least 150 cases; the totals (printed with ``-s``) are the README's figures."""
    assert len(CASES) >= 150
    if not RESULTS:
        pytest.skip("run with the cases to get the figures")
    c = Counter(r["expect"] for r in RESULTS)
    figures = {"cases": len(RESULTS), "clean errors": sum(1 for r in RESULTS if r["expect"] == "error" and r["code"] == 2
                                                        and not r["traceback"]),
               "interrupts (exit 130)": sum(1 for r in RESULTS if r["expect"] == "interrupt" and r["code"] == 130),
               "successes": sum(1 for r in RESULTS if r["expect"] == "ok" and r["code"] == 0),
               "tracebacks": sum(r["traceback"] for r in RESULTS), "hangs": sum(r["hung"] for r in RESULTS),
               "leftovers": sum(r.get("leftover", 0) for r in RESULTS),
               "inputs modified": sum(r.get("modified", 0) for r in RESULTS),
               "oracle checks passed": sum(1 for r in RESULTS if r.get("oracle") == "passed"), "by kind": dict(c)}
    print("\nfuzz figures:", json.dumps(figures))
