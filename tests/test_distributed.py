"""Multi-process runs (:mod:`onnxprune.distributed`): gloo on the CPU, 2 processes.

1. Every data-parallel stage computed by 2 processes equals one process: taylor (labels
   and sampled Fisher), ifso and infcp scores within 1e-5 relative, BN re-calibration and
   bias compensation's moments, fine-tuning (ce, kl, mse on a fixed-batch model, steps
   split 4 / 3 and a step where rank 1's part is empty) within float tolerance, and both
   ranks hold the same results (tests/distributed_cases.py, one torchrun launch).
2. ``python -m torch.distributed.run --nproc-per-node 2 -m onnxprune compress ... --steps 1
   --plan-out`` writes the plan one process writes, and only the model, the plan and the
   report appear (rank 0 writes, after recovery ran data-parallel).
3. A rank that fails (the ``ONNXPRUNE_FAIL_AT`` hook, in fine-tuning during recovery) stops
   them all: ``compress --nproc 2`` (the launcher path) exits non-zero, every rank prints
   one ``error:`` line (rank 0: its gradient all-reduce failed), no traceback, nothing is
   written.
4. In one process: no process group, no torch import, the helpers are identities,
   ``batch_shard`` gives every batch to exactly one rank, ``--nproc`` under torchrun is
   refused, the mse scale of a global batch equals one process's.

The launches use ``python -m torch.distributed.run`` (a free port through the standalone
rendezvous), one thread per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import onnxprune
from onnxprune.cli import main
from onnxprune.distributed import LOCAL, DistContext, current, fault_point, session
from onnxprune.errors import OnnxPruneError

dist = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

ROOT = Path(onnxprune.__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MODEL = ROOT / "models" / "mnist_cnn.onnx"
SAMPLES = ROOT / "models" / "mnist_cnn_samples.npz"
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ONNXPRUNE_FAIL_AT", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=600)


# ------------------------------------------------------------------ 1. stages, 2 ranks vs 1


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[dict, dict]:
    """Both ranks' results of tests/distributed_cases.py under a 2-process launch."""
    out = tmp_path_factory.mktemp("dist_cases")
    res = _run(LAUNCH + [TESTS / "distributed_cases.py", out], out)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [dict(np.load(out / f"rank{r}.npz")) for r in (0, 1)]
    assert int(ranks[0]["world"]) == 2 and int(ranks[1]["world"]) == 2
    return ranks[0], ranks[1]


@pytest.fixture(scope="module")
def one_process() -> dict:
    """The same cases in this process (one thread, as each rank)."""
    import distributed_cases

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert current() is LOCAL
        return distributed_cases.run_cases()
    finally:
        torch.set_num_threads(threads)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| relative to |b| elementwise (entries near 0 relative to b's largest)."""
    floor = 1e-9 * float(np.abs(b).max())
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), floor)))


@pytest.mark.parametrize("case", ["taylor_ce", "taylor_kl", "ifso", "ifso_batches", "infcp", "infcp_spread"])
def test_two_process_scores_equal_one_process(two_ranks, one_process, case):
    one = one_process[case]
    assert np.all(np.isfinite(one)) and np.abs(one).max() > 0
    for rank in two_ranks:
        assert rank[case].shape == one.shape
        assert _rel(rank[case], one) <= 1e-5, case
    np.testing.assert_array_equal(two_ranks[0][case], two_ranks[1][case])  # every rank: the same scores


def test_ifso_counts_every_batch_once(two_ranks):
    assert two_ranks[0]["ifso_batches"][0] == 4  # 100 samples in batches of 32, over both ranks


@pytest.mark.parametrize("case", ["bn", "bn_samples", "bias_moments"])
def test_two_process_statistics_equal_one_process(two_ranks, one_process, case):
    for rank in two_ranks:
        assert _rel(rank[case], one_process[case]) <= 1e-6, case
    assert two_ranks[0]["bn_samples"][0] == 90


@pytest.mark.parametrize("case", ["finetune_ce", "finetune_kl", "finetune_mse"])
def test_two_process_finetune_weights_equal_one_process(two_ranks, one_process, case):
    one = one_process[case]
    for rank in two_ranks:
        # float32 sums in another order: tiny against the weights and against what training moved
        assert np.abs(rank[case] - one).max() <= 1e-6 * np.abs(one).max(), case
    np.testing.assert_array_equal(two_ranks[0][case], two_ranks[1][case])


@pytest.mark.parametrize("case", ["finetune_ce_losses", "finetune_mse_losses"])
def test_two_process_finetune_losses_equal_one_process(two_ranks, one_process, case):
    one = one_process[case]
    assert one[1] < one[0]  # training lowered the loss (before, after, per-epoch losses)
    for rank in two_ranks:
        assert _rel(rank[case], one) <= 1e-5, case


def test_finetune_moves_weights_far_more_than_the_two_runs_differ(two_ranks, one_process):
    import distributed_cases
    from onnxprune.pipeline import prepare
    from onnxprune.surgery import apply_plan

    prep = prepare(MODEL)
    removed = {g.id: np.arange(0, g.size, 3) for g in prep.analysis.groups if g.prunable}
    start = distributed_cases._weights(apply_plan(prep.model, prep.analysis, removed))
    moved = np.abs(one_process["finetune_ce"] - start).max()
    assert moved > 1e3 * np.abs(two_ranks[0]["finetune_ce"] - one_process["finetune_ce"]).max()


# ------------------------------------------------------------------ 2. the CLI under torchrun

COMPRESS = ["compress", MODEL, "--data", SAMPLES, "--steps", "1", "--criterion", "taylor", "--no-bench",
            "--round-to", "1", "--samples", "128", "--train-samples", "128", "--finetune-epochs", "1",
            "--finetune-augment", "none"]


def test_torchrun_compress_writes_the_one_process_plan(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    outs = lambda d: ["-o", d / "pruned.onnx", "--plan-out", d / "plan.json", "--report", d / "report.json"]
    res1 = CliRunner().invoke(main, [str(a) for a in COMPRESS + outs(one)])
    assert res1.exit_code == 0, res1.output
    res2 = _run(LAUNCH + ["-m", "onnxprune"] + COMPRESS + outs(two), tmp_path)
    assert res2.returncode == 0, res2.stderr[-3000:]
    assert sorted(p.name for p in two.iterdir()) == ["plan.json", "pruned.onnx", "report.json"]
    assert json.loads((two / "plan.json").read_text()) == json.loads((one / "plan.json").read_text())
    plan = json.loads((one / "plan.json").read_text())
    assert any(len(g["kept"]) < g["size"] for g in plan["groups"])  # the plan cuts something
    report = json.loads((two / "report.json").read_text())
    assert report["recovery"]["finetune"]["processes"] == 2  # recovery ran data-parallel
    assert res2.stdout.count("Pruned channel groups") == 1  # rank 0 alone reports


# ------------------------------------------------------------------ 3. a failing rank


def test_a_failing_rank_stops_every_rank_and_nothing_is_written(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    res = _run([sys.executable, "-m", "onnxprune"] + COMPRESS +
               ["-o", out / "pruned.onnx", "--plan-out", out / "plan.json", "--nproc", "2"],
               tmp_path, ONNXPRUNE_FAIL_AT="finetune:1")  # rank 1 stops at its first recovery step
    assert res.returncode != 0
    err = res.stderr
    assert "error: rank 1 of 2: injected failure at finetune on rank 1" in err
    assert "processes failed" in err and "nothing written" in err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) >= 3, err  # both ranks and the launcher
    assert "Traceback" not in err
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------ 4. one process


def test_one_process_needs_no_process_group_and_no_torch():
    code = ("import sys; import onnxprune.distributed as d\n"
            "with d.session('cpu') as ctx: assert ctx is d.LOCAL and d.current() is d.LOCAL\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    res = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_world_one_helpers_are_identities():
    ctx = current()
    assert ctx is LOCAL and ctx.is_main and ctx.world == 1
    arr, ten = np.arange(3.0), torch.ones(2)
    assert ctx.all_reduce_sum(arr) is arr and ctx.all_reduce_sum(ten) is ten and ctx.all_reduce_sum(2.5) == 2.5
    assert ctx.broadcast({"a": 1}) == {"a": 1}
    ctx.barrier()
    assert ctx.on_main(lambda x: x + 1)(1) == 2
    np.testing.assert_array_equal(ctx.split(np.arange(5)), np.arange(5))
    with session("cpu") as s:
        assert s is LOCAL  # not under torchrun: nothing initialised
    assert not dist.is_initialized()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n,bs", [(0, 4), (1, 4), (5, 1), (32, 32), (100, 32), (45, 7)])
def test_batch_shard_gives_every_batch_to_one_rank(world, n, bs):
    seen = {}
    for rank in range(world):
        idx, ids = DistContext(rank, world).batch_shard(n, bs)
        assert np.all(ids % world == rank)
        batches = [idx[i:i + bs] for i in range(0, len(idx), bs)]  # batching the part again
        assert len(batches) == len(ids)
        for b, chunk in zip(ids, batches):
            np.testing.assert_array_equal(chunk, np.arange(b * bs, min(n, (b + 1) * bs)))
            seen[int(b)] = chunk
    assert sorted(seen) == list(range(-(-n // bs)))
    np.testing.assert_array_equal(np.concatenate([seen[b] for b in sorted(seen)] or [np.zeros(0)]), np.arange(n))


def test_split_gives_each_sample_of_a_step_to_one_rank():
    idx = np.array([3, 8, 9, 14, 20, 21, 30])
    parts = [DistContext(r, 2).split(idx) for r in (0, 1)]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), idx)
    assert [len(p) for p in parts] == [4, 3]


def test_fault_point_raises_only_where_named(monkeypatch):
    monkeypatch.setenv("ONNXPRUNE_FAIL_AT", "score:0")
    fault_point("finetune")
    with pytest.raises(OnnxPruneError, match="injected failure at score on rank 0"):
        fault_point("score")
    monkeypatch.setenv("ONNXPRUNE_FAIL_AT", "score:1")
    fault_point("score")


def test_bad_timeout_is_a_clear_error(monkeypatch):
    from onnxprune.distributed import _timeout

    monkeypatch.setenv("ONNXPRUNE_DIST_TIMEOUT", "soon")
    with pytest.raises(OnnxPruneError, match="ONNXPRUNE_DIST_TIMEOUT='soon': expected a number of seconds"):
        _timeout()
    monkeypatch.setenv("ONNXPRUNE_DIST_TIMEOUT", "90")
    assert _timeout().total_seconds() == 90


def test_nproc_under_torchrun_is_refused(monkeypatch, tmp_path):
    for k, v in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="localhost", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    res = CliRunner().invoke(main, ["compress", str(MODEL), "-o", str(tmp_path / "o.onnx"), "--nproc", "2"])
    assert res.exit_code == 2
    assert "error: --nproc starts its own processes; under torchrun" in res.output
    assert list(tmp_path.iterdir()) == []


def test_without_nproc_drops_only_the_option():
    from onnxprune.cli.processes import without_nproc

    assert without_nproc(["compress", "m.onnx", "--nproc", "2", "--data", "d.npz", "--nproc=3"]) == \
        ["compress", "m.onnx", "--data", "d.npz"]


def test_global_mse_scale_of_one_process_is_the_batch_variance():
    from onnxprune.criteria.loss import _scale
    from onnxprune.recover.training import _global_scales

    ref = (torch.randn(5, 3, 4, 4) * 3 + 1, torch.randn(5, 2))
    outs = (torch.zeros(5, 3, 4, 4), torch.zeros(5, 2))
    got = _global_scales(outs, ref, LOCAL, counted=True)
    for g, r in zip(got, ref):
        assert abs(float(g) - float(_scale(r))) <= 1e-6 * float(_scale(r))


def test_eval_under_torchrun_reports_once(tmp_path):
    """eval is one process's job: under a 2-process launch only rank 0 prints and writes."""
    report = tmp_path / "eval.json"
    res = _run(LAUNCH + ["-m", "onnxprune", "eval", MODEL, "--data", SAMPLES, "--samples", "64",
                         "--report", report], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("accuracy") >= 1 and report.exists()
    one = _run([sys.executable, "-m", "onnxprune", "eval", MODEL, "--data", SAMPLES, "--samples", "64"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert res.stdout.count("accuracy") == one.stdout.count("accuracy")  # not once per rank


def test_the_report_counts_the_bad_samples_of_every_rank(tmp_path):
    """Bad rows met by either rank are counted in rank 0's report, as one process counts them."""
    x = np.load(SAMPLES)["x"][:128].astype(np.float32)
    bad_rows = [3, 40, 77, 101]  # in batches 0 and 2 (rank 0) and 1 and 3 (rank 1) of 32
    x[bad_rows] = np.nan
    np.save(tmp_path / "bad.npy", x)
    args = [MODEL, "--data", tmp_path / "bad.npy", "--criterion", "taylor", "--steps", "1", "--no-recover",
            "--no-bench", "--val-split", "0", "--target-macs", "0.7", "--round-to", "1", "--batch-size", "32"]
    reports = []
    for name, launch in (("one", [sys.executable]), ("two", LAUNCH)):
        d = tmp_path / name
        d.mkdir()
        cmd = launch + ["-m", "onnxprune", "compress"] + args + ["-o", d / "p.onnx", "--report", d / "r.json"]
        res = _run(cmd, tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        reports.append(json.loads((d / "r.json").read_text()))
    lines = [[w for w in r["warnings"] if "bad sample(s) skipped" in w] for r in reports]
    assert len(lines[0]) == 1 and "4 bad sample(s)" in lines[0][0]
    assert lines[1] and "4 bad sample(s)" in lines[1][0]
