"""Tests of onnxprune.report: JSON schema and round trip, atomic write, rich rendering."""

from __future__ import annotations

import dataclasses
import io
import json
import os

import pytest
from rich.console import Console

from onnxprune.runtime.latency import LatencyStats
from onnxprune.errors import OutputPathError
from onnxprune.report import CompressReport, GroupRow, format_count
from onnxprune.runtime.verify import OutputFidelity, VerifyResult


def stats(median: float, threads: int | None = 4) -> LatencyStats:
    return LatencyStats(
        median_ms=median, p90_ms=median + 1.0, mean_ms=median + 0.25, min_ms=median - 0.5,
        runs=30, provider="CPUExecutionProvider", threads=threads, batch=1,
    )


GROUPS = (
    GroupRow("layer1.conv1", "Conv", 32, 64, None),
    GroupRow("layer2.conv2", "Conv", 96, 128, None),
    GroupRow("stem.conv", "Conv", 64, 64, None),
    GroupRow("head.fc_in", "Gemm", 512, 512, "feeds graph output 'logits'"),
)


def make_report(**changes) -> CompressReport:
    fields = dict(
        input_path="resnet50.onnx",
        output_path="resnet50.pruned.onnx",
        criterion="cpmc",
        target="macs=0.5",
        macs_before=4_089_000_000,
        macs_after=2_050_000_000,
        params_before=25_557_032,
        params_after=14_000_000,
        latency_before=stats(20.0),
        latency_after=stats(12.5),
        groups=GROUPS,
        stage_seconds={"load": 0.5, "analyze": 1.25, "score": 3.0},
        reachable=None,
        warnings=("3 groups blocked by unsupported op Einsum",),
        fidelity=None,
    )
    fields.update(changes)
    return CompressReport(**fields)


def test_ratios():
    r = make_report()
    assert r.macs_ratio == pytest.approx(2_050_000_000 / 4_089_000_000)
    assert r.params_ratio == pytest.approx(14_000_000 / 25_557_032)
    assert r.ideal_speedup == pytest.approx(4_089_000_000 / 2_050_000_000)
    assert r.measured_speedup == pytest.approx(20.0 / 12.5)
    assert make_report(latency_after=None).measured_speedup is None
    assert make_report(latency_before=None, latency_after=None).measured_speedup is None


def test_json_round_trip_schema():
    r = make_report()
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert set(d) == {
        "input", "output", "criterion", "target", "macs", "params", "latency_ms", "groups",
        "stage_seconds", "reachable", "warnings", "fidelity", "criterion_info", "round_to", "latency_target",
        "recovery", "schedule", "held_out",
    }
    assert d["round_to"] is None and d["latency_target"] is None
    assert d["criterion_info"] == {}
    info = {"ensemble_members": 4, "spread": 0.25}
    assert json.loads(json.dumps(make_report(criterion_info=info).to_dict()))["criterion_info"] == info
    assert d["input"] == "resnet50.onnx" and d["output"] == "resnet50.pruned.onnx"
    assert d["criterion"] == "cpmc" and d["target"] == "macs=0.5"
    assert d["macs"] == {"before": 4_089_000_000, "after": 2_050_000_000, "ratio": pytest.approx(r.macs_ratio)}
    assert d["params"] == {"before": 25_557_032, "after": 14_000_000, "ratio": pytest.approx(r.params_ratio)}
    lat = d["latency_ms"]
    assert set(lat) == {"before", "after", "speedup", "ideal_speedup", "realized_over_ideal"}
    assert lat["realized_over_ideal"] == pytest.approx(1.6 / (4_089_000_000 / 2_050_000_000))
    assert lat["before"] == {
        "median": 20.0, "p90": 21.0, "mean": 20.25, "min": 19.5, "runs": 30,
        "provider": "CPUExecutionProvider", "threads": 4, "batch": 1, "peak_memory_mb": None,
    }
    assert lat["after"]["median"] == 12.5
    assert lat["speedup"] == pytest.approx(1.6)
    assert lat["ideal_speedup"] == pytest.approx(4_089_000_000 / 2_050_000_000)
    assert d["groups"][0] == {"name": "layer1.conv1", "op": "Conv", "kept": 32, "total": 64, "blocked_reason": None}
    assert d["groups"][3]["blocked_reason"] == "feeds graph output 'logits'"
    assert len(d["groups"]) == 4
    assert d["stage_seconds"] == {"load": 0.5, "analyze": 1.25, "score": 3.0}
    assert d["reachable"] is None
    assert d["warnings"] == ["3 groups blocked by unsupported op Einsum"]
    assert d["fidelity"] is None


def test_json_without_latency_and_with_zero_macs():
    r = make_report(latency_before=None, latency_after=None, macs_after=0, reachable="reached macs=0.62")
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["latency_ms"]["before"] is None and d["latency_ms"]["after"] is None
    assert d["latency_ms"]["speedup"] is None
    assert d["latency_ms"]["ideal_speedup"] is None  # infinite -> null, strict JSON
    assert d["macs"]["ratio"] == 0.0
    assert d["reachable"] == "reached macs=0.62"


def test_fidelity_from_verify_result_is_json_ready():
    vr = VerifyResult(
        output_shapes={"logits": (1, 1000)},
        fidelity={"logits": OutputFidelity(0.5, 0.05, 0.99, 0.875)},
    )
    for fid in (vr.to_dict(), vr.fidelity):
        d = json.loads(json.dumps(make_report(fidelity=fid).to_dict(), allow_nan=False))
        outputs = d["fidelity"].get("outputs", d["fidelity"])
        assert outputs["logits"] == {
            "max_abs_error": 0.5, "max_rel_error": 0.05, "cosine": 0.99, "top1_agreement": 0.875,
        }


def test_write_json_atomic(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old contents")
    r = make_report()
    returned = r.write_json(target)
    assert returned == target
    assert json.loads(target.read_text()) == json.loads(json.dumps(r.to_dict()))
    assert sorted(os.listdir(tmp_path)) == ["report.json"]  # no temp file left behind


def test_write_json_missing_dir(tmp_path):
    with pytest.raises(OutputPathError, match="report.json"):
        make_report().write_json(tmp_path / "no" / "such" / "report.json")
    assert not (tmp_path / "no").exists()


def test_report_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_report().criterion = "l1"  # type: ignore[misc]


def render_text(report: CompressReport, **kwargs) -> str:
    console = Console(record=True, width=120, file=io.StringIO())
    report.render(console, **kwargs)
    return console.export_text()


def test_render_summary_and_changed_groups():
    text = render_text(make_report())
    assert "4.09 GMACs" in text and "2.05 GMACs" in text
    assert "25.6 M" in text and "14.0 M" in text
    assert "20.00 ms" in text and "12.50 ms" in text
    assert "1.60x measured" in text and "1.99x ideal" in text
    assert "layer1.conv1" in text and "32/64" in text
    assert "layer2.conv2" in text and "96/128" in text
    # unchanged and blocked groups are only counted
    assert "stem.conv" not in text and "head.fc_in" not in text
    assert "1 unchanged and 1 blocked" in text
    for stage in ("load", "analyze", "score"):
        assert stage in text
    assert "warning: 3 groups blocked by unsupported op Einsum" in text


def test_render_verbose_shows_all_groups_and_reasons():
    text = render_text(make_report(), verbose=True)
    for g in GROUPS:
        assert g.name in text
    assert "feeds graph output 'logits'" in text


def test_render_without_latency_with_fidelity_and_reachable():
    fid = VerifyResult({"logits": (1, 10)}, {"logits": OutputFidelity(0.5, 0.05, 0.99, 0.875)})
    text = render_text(
        make_report(latency_before=None, latency_after=None, fidelity=fid.to_dict(),
                    reachable="target macs=0.5 not reachable; reached 0.62")
    )
    assert "4.09 GMACs" in text
    assert "ms" not in text.replace("params", "")
    assert "not reachable; reached 0.62" in text
    assert "logits" in text and "0.9900" in text and "87.5%" in text


def test_render_escapes_markup_in_names():
    groups = (GroupRow("blocks[0].conv", "Conv", 3, 8, None),)
    text = render_text(make_report(groups=groups, warnings=("odd [bold]name[/bold]",)))
    assert "blocks[0].conv" in text
    assert "odd [bold]name[/bold]" in text


def test_render_warnings_are_yellow():
    console = Console(record=True, width=120, force_terminal=True, color_system="standard")
    make_report().render(console)
    ansi = console.export_text(styles=True)
    assert "\x1b[33mwarning: 3 groups blocked by unsupported op Einsum\x1b[0m" in ansi


@pytest.mark.parametrize(
    "n, unit, expected",
    [
        (0, "", "0"),
        (512, "", "512"),
        (999, "MACs", "999 MACs"),
        (1000, "", "1.00 K"),
        (1234, "", "1.23 K"),
        (999_500, "", "1.00 M"),
        (25_557_032, "", "25.6 M"),
        (4_089_000_000, "MACs", "4.09 GMACs"),
        (123_400_000_000, "MACs", "123 GMACs"),
        (-2500, "", "-2.50 K"),
    ],
)
def test_format_count(n, unit, expected):
    assert format_count(n, unit) == expected
