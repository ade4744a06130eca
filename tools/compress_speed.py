"""Speed and memory of ``onnxprune compress`` against the floor of the same model (issue 12).

Per model and repetition, each in a fresh subprocess, on the same machine in the same run:

- ``floor``: ``onnx.load`` + an onnxruntime session (CPU, default options, from the file)
  + one run on random inputs + ``onnx.save``, timed inside the process (imports excluded);
- ``compress``: wall time of ``python -m onnxprune compress MODEL --no-bench --round-to 1
  --criterion l1 --target-macs 0.5``, process start-up and imports included, its peak RSS
  (``ru_maxrss`` of that child, from ``os.wait4``) and the report's ``stage_seconds``
  (``steps`` split into score / apply / re-analysis from the step record);
- ``weights``: the model's parameter bytes (the report's params before x 4, float32).

The minimum over ``--repeat`` runs of each figure is kept (a shared machine's load only
adds time). Goals: compress wall <= 5x floor; peak RSS <= 3x weights + 0.5 GiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30

_FLOOR = r"""
import sys, time, tempfile, os
import numpy as np, onnx, onnxruntime as ort
path, out = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
m = onnx.load(path)
s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
feeds = {}
for i in s.get_inputs():
    shape = [d if isinstance(d, int) and d > 0 else (1 if k == 0 else 224) for k, d in enumerate(i.shape)]
    feeds[i.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
s.run(None, feeds)
onnx.save(m, out)
print(time.perf_counter() - t0)
"""


def _run_child(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """(wall s, peak RSS bytes of that child, stdout) of one child process (``os.wait4``).

    Raises:
        RuntimeError: the child failed (its stderr tail in the message).
    """
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:5])} ... failed (exit {p.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss * 1024, out


def measure(model: Path, repeat: int = 1, extra: list[str] | None = None) -> dict:
    """Floor and compress figures of one model (minimum over ``repeat`` runs of each)."""
    env = dict(os.environ)
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxprune-speed-") as tmp:
        for _ in range(repeat):
            floor_out = str(Path(tmp) / "floor.onnx")
            _, _, out = _run_child([sys.executable, "-c", _FLOOR, str(model), floor_out], env)
            floor = float(out.strip().splitlines()[-1])
            report = Path(tmp) / "report.json"
            cmd = [sys.executable, "-m", "onnxprune", "compress", str(model), "-o", str(Path(tmp) / "pruned.onnx"),
                   "--no-bench", "--round-to", "1", "--criterion", "l1", "--target-macs", "0.5",
                   "--report", str(report)] + list(extra or [])
            wall, rss, _ = _run_child(cmd, env)
            r = json.loads(report.read_text())
            rows.append({"floor_s": floor, "wall_s": wall, "rss": rss, "report": r})
            os.unlink(report)
    best = min(rows, key=lambda x: x["wall_s"])
    r = best["report"]
    st = dict(r.get("stage_seconds", {}))
    step = (r.get("schedule") or [{}])[0].get("seconds", {}) if r.get("schedule") else {}
    stages = {"canonicalize": st.get("canonicalize", 0.0), "analyze": st.get("analyze", 0.0),
              "score": step.get("score", 0.0), "apply": step.get("plan_apply", 0.0),
              "re-analyze": step.get("analyze", 0.0), "verify": st.get("verify", 0.0), "save": st.get("save", 0.0)}
    stages["start-up+other"] = best["wall_s"] - sum(st.values())
    return {"model": model.stem, "floor_s": min(x["floor_s"] for x in rows), "wall_s": best["wall_s"],
            "rss": min(x["rss"] for x in rows), "weights": int(r["params"]["before"]) * 4,
            "params": int(r["params"]["before"]), "stages": stages}


def table(rows: list[dict]) -> str:
    """The markdown table of :func:`measure` rows."""
    lines = ["| model | compress wall | floor | peak RSS (goal) | stages (s) |", "|---|---|---|---|---|"]
    for x in rows:
        goal = (3 * x["weights"] + GIB / 2) / GIB
        stages = ", ".join(f"{k} {v:.2f}" for k, v in x["stages"].items())
        lines.append(f"| {x['model']} ({x['params'] / 1e6:.1f}M params) | {x['wall_s']:.2f} s "
                     f"({x['wall_s'] / x['floor_s']:.1f}x) | {x['floor_s']:.2f} s | {x['rss'] / GIB:.2f} GiB "
                     f"(<= {goal:.2f}) | {stages} |")
    return "\n".join(lines)
