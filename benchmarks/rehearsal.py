"""`python -m benchmarks.rehearsal --samples N --classes K --out FILE.json`: the user's whole
path at WebVision scale on the local autoscaling cluster (see benchmarks/scale_rehearsal.py)."""

from __future__ import annotations

import sys

from benchmarks.scale_rehearsal import main

if __name__ == "__main__":
    sys.exit(main())
