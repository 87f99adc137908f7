"""The self-contained HTML report of a cleaning run (`render_report`, `write_report`)."""

from cleaner.report.checks import checks_thumbnail_keys
from cleaner.report.html import render_report, top_noisy_keys, write_report

__all__ = ["checks_thumbnail_keys", "render_report", "top_noisy_keys", "write_report"]
