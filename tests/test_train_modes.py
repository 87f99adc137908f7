"""benchmarks.train_modes without Ray: argument checks, aggregation over seeds, the
issue's checks, and the comparison report (one table and one curve plot per pattern)."""

from __future__ import annotations

import base64
import re

import pytest

from benchmarks.train_modes import aggregate, checks, parse_args
from training.config import MIXFIX_MODES, RECOMMENDED_MODE
from training.report import render_comparison_report


def _run(curve, precision, selected):
    return {
        "history": [
            {"epoch": e + 1, "test_accuracy": a, "selected_precision": p, "selected": s}
            for e, (a, p, s) in enumerate(zip(curve, precision, selected, strict=True))
        ],
        "seconds": 1.0,
    }


def test_parse_args_expands_recommended_and_rejects_unknown_modes():
    args = parse_args(["--data", "d", "--out", "o.json", "--modes", "noisy,recommended"])
    assert args.modes == ["noisy", RECOMMENDED_MODE] and args.seeds == [0]
    assert parse_args(["--data", "d", "--out", "o"]).modes == list(MIXFIX_MODES)
    assert parse_args(["--data", "d", "--out", "o", "--seeds", "0,1,2"]).seeds == [0, 1, 2]
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", "--out", "o", "--modes", "noisy,best"])
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", "--out", "o", "--seeds", "a"])


def test_aggregate_uses_the_final_epoch_never_the_best():
    runs = [
        _run([0.5, 0.9, 0.6], [0.8, 0.9, 0.95], [10, 12, 14]),
        _run([0.4, 0.7, 0.8], [0.7, 0.8, None], [10, 12, 16]),
    ]
    result = aggregate(runs)
    assert result["test_accuracy"] == pytest.approx(0.7)  # finals 0.6 and 0.8, not 0.9
    assert result["test_accuracy_seeds"] == [0.6, 0.8]
    assert result["test_accuracy_std"] == pytest.approx(0.1414, abs=1e-4)
    assert result["curve"] == pytest.approx([0.45, 0.8, 0.7])
    assert result["selected_precision"] == pytest.approx([0.75, 0.85, 0.95])
    assert result["selected"] == 15


def test_checks_state_the_issue_targets():
    modes = {
        "noisy": {"test_accuracy": 0.60},
        "clean_only": {"test_accuracy": 0.72},
        RECOMMENDED_MODE: {"test_accuracy": 0.705},
    }
    out = checks(modes, RECOMMENDED_MODE)
    assert out["clean_only_minus_noisy"] == pytest.approx(0.12)
    assert out["recommended_beats_noisy"] is True
    assert out["recommended_within_tolerance"] is False  # 0.015 below clean_only
    modes[RECOMMENDED_MODE]["test_accuracy"] = 0.64
    out = checks(modes, RECOMMENDED_MODE)
    assert out["recommended_beats_noisy"] is False
    assert checks({"noisy": {"test_accuracy": 0.6}}, RECOMMENDED_MODE) == {}


def test_comparison_report_has_a_table_and_a_decodable_plot_per_pattern():
    mode_result = aggregate([_run([0.5, 0.6], [0.9, 0.9], [5, 5])])
    result = {
        "recommended": "clean_only",
        "seeds": [0],
        "epochs": 2,
        "command": "python -m benchmarks.train_modes --data <x>",
        "patterns": {
            "hard-0.4": {
                "clean": {"samples": 10, "clean": 5, "precision": 0.98},
                "modes": {"noisy": mode_result, "clean_only": mode_result},
            },
            "symmetric-0.4": {"clean": {}, "modes": {"noisy": mode_result}},
        },
    }
    page = render_comparison_report(result)
    assert page.count("<table>") == 2 and "hard-0.4" in page and "symmetric-0.4" in page
    assert "<b>clean_only</b> (recommended)" in page
    assert "&lt;x&gt;" in page and "<x>" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
