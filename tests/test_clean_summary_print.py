"""The clean job's closing summary lines (jobs.clean.print_summary)."""

from __future__ import annotations

from jobs.clean import print_summary


def test_undefined_detection_metrics_print_as_na(capsys):
    """No wrong label among the true labels (a clean test list, say): precision, recall
    and F1 are undefined (None) and must not crash the job's last line."""
    print_summary(
        {
            "counts": {"samples": 3, "clean": 3, "noisy": 0, "failed": 0},
            "output": "runs/x",
            "detection": {"precision": None, "recall": None, "f1": None, "auroc": 0.5},
        }
    )
    out = capsys.readouterr().out
    assert "precision n/a recall n/a f1 n/a auroc 0.5000" in out
    assert "3 samples: 3 clean, 0 noisy, 0 failed" in out
