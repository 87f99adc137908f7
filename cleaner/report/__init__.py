"""The self-contained HTML report of a cleaning run (`render_report`, `write_report`)."""

from cleaner.report.html import render_report, top_noisy_keys, write_report

__all__ = ["render_report", "top_noisy_keys", "write_report"]
