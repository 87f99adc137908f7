"""The self-contained HTML report of a cleaning run."""
