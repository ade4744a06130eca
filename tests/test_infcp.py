"""The ``infcp`` criterion (onnxprune.criteria.infcp; Lai, Xiang, Shen, arXiv 2112.02521).

1. Hand computation: with one member and no fine-tuning the score of channel c is
   |dL/dalpha_c| with alpha_c scaling every weight c owns (sum_w w dL/dw = dL/dalpha),
   computed here by autograd through the scales (TorchGraph via functional_call), on a
   model with BatchNormalization (whose running statistics do not count) and on the
   LeNet (Flatten -> Gemm slices); the batch size does not change it.
2. Planted channels on the tiny LeNet: a dead conv2 channel scores exactly 0 (the
   lowest) in every member; a channel whose fc1 slice is scaled x10 scores the highest,
   with labels (fine-tuned members) and without (sampled labels).
3. Reproducible with the seed; another seed, other members and fine-tuning change the
   scores; the original model is left untouched.
4. Shards are disjoint and cover the data; the spread figures (Spearman, CV) are right on
   known inputs and land in Scores.info.
5. Without labels: ``kl`` (the default) skips fine-tuning and samples labels from the
   original's softmax (seeded, labels ignored); ``ce`` uses the original's argmax, so it
   equals ``ce`` with those labels; on a non-classifier ``mse`` skips fine-tuning and
   uses sampled projections; ``ce`` there is a clear error.
6. CLI: ``onnxprune compress --criterion infcp --data x.npz --ensemble 2`` writes a model
   that runs and a report whose criterion_info carries the spread.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from onnxprune.analysis import Analysis
from onnxprune.criteria import get_criterion
from onnxprune.criteria.infcp import InfCP, ensemble_shards, ensemble_spread, spearman
from onnxprune.data import CalibrationData
from onnxprune.errors import OnnxPruneError
from onnxprune.executor.graph_module import TorchGraph
from planted import analyze_tiny as _analyze, planted_lenet
from tiny_models import ALL_BUILDERS, INPUT_SHAPES, build_lenet

DEAD, DOMINANT = 3, 54


def _inputs(name: str, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *INPUT_SHAPES[name][1:])).astype(np.float32)


def _argmax(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return TorchGraph(model, requires_grad=False)(torch.from_numpy(x))[0].argmax(1).numpy().astype(np.int64)


# ------------------------------------------------------------------------------------
# 1. hand computation
# ------------------------------------------------------------------------------------


def _hand_influence(model: onnx.ModelProto, analysis: Analysis, x: np.ndarray, y: np.ndarray) -> dict:
    """|dL/dalpha_c| per channel of every prunable group, L = mean cross-entropy over all
    of x, alpha_c multiplying every weight channel c owns (BN running stats excluded)."""
    graph = TorchGraph(model, requires_grad=False)
    names = {n: i for i, (n, _) in enumerate(graph.named_onnx_parameters())}
    params = dict(graph.named_onnx_parameters())
    bn_stats = {t for n in model.graph.node if n.op_type == "BatchNormalization" for t in n.input[3:5]}
    module_names = {n: f"_params.{graph._param_index[n]}" for n in names}
    xt, yt = torch.from_numpy(x).double(), torch.from_numpy(y)
    graph = graph.double()
    out = {}
    for g in analysis.groups:
        if not g.prunable:
            continue
        alpha = torch.ones(g.size, dtype=torch.float64, requires_grad=True)
        ext = torch.cat([torch.ones(1, dtype=torch.float64), alpha])
        idx_maps: dict[str, np.ndarray] = {}
        for m in g.members:
            if m.tensor in bn_stats or m.tensor not in params:
                continue
            idx = idx_maps.setdefault(m.tensor, np.zeros(params[m.tensor].shape, dtype=np.int64))
            view = idx if m.rows is None else idx[m.rows[0]:m.rows[1]]
            np.moveaxis(view, m.axis, 0)[m.positions] = m.channels[:, None].reshape(
                (-1,) + (1,) * (view.ndim - 1)) + 1
        override = {module_names[t]: params[t].detach().double() * ext[torch.from_numpy(ix)]
                    for t, ix in idx_maps.items()}
        logits = torch.func.functional_call(graph, override, (xt,))[0]
        loss = F.cross_entropy(logits, yt)
        (grad,) = torch.autograd.grad(loss, alpha)
        out[g.id] = grad.abs().numpy()
    return out


@pytest.mark.parametrize("name", ["residual", "lenet"])
def test_single_member_without_finetuning_is_the_hand_computed_influence(name):
    model = ALL_BUILDERS[name](seed=2)
    analysis = _analyze(model, name)
    x = _inputs(name, 12, seed=3)
    y = np.random.default_rng(4).integers(0, 4 if name == "residual" else 10, 12)
    want = _hand_influence(model, analysis, x, y)
    crit = InfCP(members=1, finetune_steps=0)
    got_one = crit.score_with_data(analysis, model, CalibrationData(x, y), batch_size=12)
    got_many = crit.score_with_data(analysis, model, CalibrationData(x, y), batch_size=5)
    assert set(got_one) == set(want) and want
    for gid, w in want.items():
        assert got_one[gid].dtype == np.float64 and got_one[gid].shape == w.shape
        np.testing.assert_allclose(got_one[gid], w, rtol=2e-4, atol=1e-7 * w.max())
        np.testing.assert_allclose(got_many[gid], w, rtol=2e-4, atol=1e-7 * w.max())
    assert sum(np.count_nonzero(w) for w in want.values()) >= 0.5 * sum(w.size for w in want.values())  # non-trivial
    assert got_one.info["members"] == 1 and got_one.info["finetune_steps"] == 0
    assert "member_rank_correlation" not in got_one.info  # no spread with one member


def test_bn_running_statistics_are_not_counted():
    # residual: the BN groups own running mean/var; counting them changes the score, so
    # the hand computation above (which leaves them out) would then disagree. Check that
    # they are present in the group, to make the exclusion meaningful.
    model = ALL_BUILDERS["residual"]()
    analysis = _analyze(model, "residual")
    bn_stats = {t for n in model.graph.node if n.op_type == "BatchNormalization" for t in n.input[3:5]}
    assert any(m.tensor in bn_stats for g in analysis.groups if g.prunable for m in g.members)


# ------------------------------------------------------------------------------------
# 2. planted channels
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("labelled", [True, False])
def test_planted_dead_lowest_and_dominant_highest(seed, labelled):
    # labels = the planted model's argmax (ce, fine-tuned members), or none (kl: labels
    # sampled from the planted model's softmax, no fine-tuning)
    model = planted_lenet(DEAD, DOMINANT)
    analysis = _analyze(model, "lenet")
    x = _inputs("lenet", 32, seed)
    data = CalibrationData(x, _argmax(model, x) if labelled else None)
    scores = InfCP(batch_size=8).score_with_data(analysis, model, data, seed=seed, return_members=True)
    assert set(scores) == {g.id for g in analysis.groups if g.prunable}
    g = analysis.group("conv2")
    s = scores[g.id]
    assert s.dtype == np.float64 and s.shape == (g.size,) and np.all(np.isfinite(s))
    assert s[DEAD] == 0.0 and int(np.argmin(s)) == DEAD and np.count_nonzero(s) == g.size - 1
    assert int(np.argmax(s)) == DOMINANT
    assert np.sort(s)[-1] > 3 * np.sort(s)[-2]  # by a margin (>= 3.7 on seeds 0-9, both paths)
    members = scores.info["member_scores"]
    assert len(members) == 4 and all(m[g.id][DEAD] == 0.0 for m in members)  # fine-tuning keeps it dead
    np.testing.assert_allclose(np.mean([m[g.id] for m in members], axis=0), s, rtol=1e-12)


# ------------------------------------------------------------------------------------
# 3. reproducibility, members, fine-tuning, the original untouched
# ------------------------------------------------------------------------------------


def test_reproducible_members_differ_and_finetuning_moves():
    model = build_lenet(seed=1)
    before = model.SerializeToString()
    analysis = _analyze(model, "lenet")
    x = _inputs("lenet", 12, seed=5)
    data = CalibrationData(x, _argmax(model, x))
    crit = get_criterion("infcp", batch_size=2, members=3)
    assert isinstance(crit, InfCP) and crit.requires_data and crit.normalize
    a = crit.score_with_data(analysis, model, data, seed=7, return_members=True)
    b = crit.score_with_data(analysis, model, data, seed=7)
    c = crit.score_with_data(analysis, model, data, seed=8)
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)  # other shards
    assert model.SerializeToString() == before  # copies only
    m = a.info["member_scores"]
    for k in a:
        assert not np.array_equal(m[0][k], m[1][k]) and not np.array_equal(m[1][k], m[2][k])
    assert a.info["finetune_steps"] == 2  # one pass over a shard of 4 in batches of 2
    # fine-tuning changes the influence; without it, the members see the original weights
    still = InfCP(batch_size=2, members=3, finetune_steps=0).score_with_data(analysis, model, data, seed=7)
    assert still.info["finetune_steps"] == 0
    assert any(not np.allclose(a[k], still[k], rtol=1e-6) for k in a)
    longer = InfCP(batch_size=2, members=3, finetune_steps=5).score_with_data(analysis, model, data, seed=7)
    assert longer.info["finetune_steps"] == 5


def test_bad_settings_are_clear_errors():
    model = build_lenet()
    analysis = _analyze(model, "lenet")
    data = CalibrationData(_inputs("lenet", 3, 0), None)
    with pytest.raises(OnnxPruneError, match="at least 4 calibration samples"):
        InfCP().score_with_data(analysis, model, data)
    with pytest.raises(OnnxPruneError, match="finetune_steps"):
        InfCP(members=1, finetune_steps=-1).score_with_data(analysis, model, data)
    with pytest.raises(OnnxPruneError, match="needs calibration data"):
        InfCP().score(analysis, {})


# ------------------------------------------------------------------------------------
# 4. shards and spread
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(10, 4), (7, 7), (513, 4), (5, 1)])
def test_shards_are_disjoint_and_cover(n, k):
    shards = ensemble_shards(n, k, seed=3)
    assert len(shards) == k
    allidx = np.concatenate(shards)
    assert np.array_equal(np.sort(allidx), np.arange(n))  # cover, no repeats
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    again = ensemble_shards(n, k, seed=3)
    assert all(np.array_equal(s, t) for s, t in zip(shards, again))
    if k > 1:
        other = ensemble_shards(n, k, seed=4)
        assert any(not np.array_equal(s, t) for s, t in zip(shards, other))
    with pytest.raises(OnnxPruneError):
        ensemble_shards(k - 1, k)


def test_spread_figures_on_known_inputs():
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    # ties get average ranks: ranks (1.5, 1.5, 3) vs (1, 2, 3) -> rho = 0.866...
    assert spearman(np.array([0.0, 0, 5]), np.array([1.0, 2, 3])) == pytest.approx(np.sqrt(3) / 2)
    same = {0: np.array([1.0, 2, 3, 4]), 1: np.array([2.0, 2])}
    spread = ensemble_spread([same, same])
    assert spread == {"member_rank_correlation": pytest.approx(1.0), "member_cv": 0.0}
    # members (1, 3) on every channel: std 1, mean 2 -> cv 0.5; a reversed ranking -> -1
    a = {0: np.array([1.0, 3, 1, 3])}
    b = {0: np.array([3.0, 1, 3, 1])}
    spread = ensemble_spread([a, b])
    assert spread["member_cv"] == pytest.approx(0.5) and spread["member_rank_correlation"] == pytest.approx(-1.0)
    assert ensemble_spread([{0: np.zeros(2)}, {0: np.zeros(2)}]) == {"member_rank_correlation": None,
                                                                     "member_cv": None}


def test_info_carries_the_spread():
    model = build_lenet(seed=3)
    analysis = _analyze(model, "lenet")
    x = _inputs("lenet", 20, seed=1)
    s = InfCP(batch_size=8).score_with_data(analysis, model, CalibrationData(x, _argmax(model, x)))
    info = s.info
    assert info["members"] == 4 and info["shard_sizes"] == [5, 5, 5, 5] and info["loss"] == "ce (labels)"
    assert -1.0 <= info["member_rank_correlation"] <= 1.0 and info["member_cv"] > 0
    json.dumps(info)  # JSON-ready for the report


# ------------------------------------------------------------------------------------
# 5. without labels; non-classifiers
# ------------------------------------------------------------------------------------


def test_without_labels_kl_samples_labels_and_ce_uses_the_argmax():
    model = build_lenet(seed=4)
    analysis = _analyze(model, "lenet")
    x = _inputs("lenet", 16, seed=2)
    crit = InfCP(batch_size=4, members=2)
    auto = crit.score_with_data(analysis, model, CalibrationData(x, None), seed=1)  # auto -> kl
    assert auto.info["loss"].startswith("kl (labels sampled") and auto.info["finetune_steps"] == 0
    again = crit.score_with_data(analysis, model, CalibrationData(x, None), seed=1)
    other = crit.score_with_data(analysis, model, CalibrationData(x, None), seed=2)
    # explicit kl ignores labels (teacher loss): the same draws whatever the labels
    wrong = (_argmax(model, x) + 1) % 10
    kl = InfCP(batch_size=4, members=2, loss="kl").score_with_data(analysis, model, CalibrationData(x, wrong), seed=1)
    for k in auto:
        np.testing.assert_array_equal(auto[k], again[k])
        np.testing.assert_array_equal(kl[k], auto[k])
    assert any(not np.array_equal(auto[k], other[k]) for k in auto)
    # the KL's own gradient at the original is 0; the sampled one is not
    one = InfCP(members=1).score_with_data(analysis, model, CalibrationData(x, None))
    assert sum(np.count_nonzero(v) for v in one.values()) >= 0.5 * sum(v.size for v in one.values())
    # ce without labels: the original's argmax as labels, fine-tuned like real labels
    ce = InfCP(batch_size=4, members=2, loss="ce")
    pseudo = ce.score_with_data(analysis, model, CalibrationData(x, None), seed=1)
    labelled = ce.score_with_data(analysis, model, CalibrationData(x, _argmax(model, x)), seed=1)
    assert pseudo.info["loss"].startswith("ce (pseudo-labels") and labelled.info["loss"] == "ce (labels)"
    assert pseudo.info["finetune_steps"] == labelled.info["finetune_steps"] == 2
    for k in pseudo:
        np.testing.assert_allclose(pseudo[k], labelled[k], rtol=1e-5)


def test_non_classifier_uses_sampled_projections_without_finetuning():
    model = ALL_BUILDERS["concat"]()
    analysis = _analyze(model, "concat")
    x = np.concatenate([_inputs("concat", 4, seed=s) for s in range(2)])
    data = CalibrationData(x, None)
    with pytest.raises(OnnxPruneError, match="classifier"):
        InfCP(loss="ce").score_with_data(analysis, model, data)
    crit = InfCP(batch_size=2)
    a = crit.score_with_data(analysis, model, data, seed=3)
    b = crit.score_with_data(analysis, model, data, seed=3)
    c = crit.score_with_data(analysis, model, data, seed=4)
    assert a.info["finetune_steps"] == 0 and a.info["loss"].startswith("mse")
    vals = np.concatenate(list(a.values()))
    assert np.all(np.isfinite(vals)) and np.all(vals >= 0) and np.count_nonzero(vals) == vals.size
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    assert a.info["member_cv"] > 0


# ------------------------------------------------------------------------------------
# 6. CLI
# ------------------------------------------------------------------------------------


def test_cli_compress_with_infcp(tmp_path: Path):
    from onnxprune.cli import main

    src = tmp_path / "lenet.onnx"
    model = build_lenet(seed=0)
    onnx.save(model, str(src))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cal.npz", x=rng.normal(size=(16, 1, 28, 28)).astype(np.float32))  # no labels
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(main, ["compress", str(src), "--criterion", "infcp", "--data", str(tmp_path / "cal.npz"),
                                    "--ensemble", "2", "--batch-size", "4", "--target-macs", "0.5", "--no-bench",
                                    "-o", str(out), "--report", str(rep), "--steps", "1", "--no-recover"])
    assert res.exit_code == 0, res.output
    assert "member_rank_correlation" in res.output
    report = json.loads(rep.read_text())
    assert report["criterion"] == "infcp"
    assert report["macs"]["after"] / report["macs"]["before"] <= 0.53
    info = report["criterion_info"]
    # 16 samples: 2 held out for validation (10 %), the 14 others in two disjoint shards
    assert info["members"] == 2 and info["shard_sizes"] == [7, 7]
    assert -1.0 <= info["member_rank_correlation"] <= 1.0 and info["member_cv"] >= 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": rng.normal(size=(1, 1, 28, 28)).astype(np.float32)})
    assert y.shape == (1, 10)


def test_cli_infcp_too_few_samples_is_a_user_error(tmp_path: Path):
    from onnxprune.cli import main

    src = tmp_path / "lenet.onnx"
    onnx.save(build_lenet(seed=0), str(src))
    np.savez(tmp_path / "cal.npz", x=np.zeros((3, 1, 28, 28), np.float32))
    res = CliRunner().invoke(main, ["compress", str(src), "--criterion", "infcp", "--data", str(tmp_path / "cal.npz"),
                                    "--no-bench", "-o", str(tmp_path / "p.onnx")])
    assert res.exit_code == 2 and "error:" in res.output and "--ensemble" in res.output
    assert not (tmp_path / "p.onnx").exists()
