"""What the clean job's driver holds to write the report: the peak memory growth of reading
a manifest for the report, as before (every scalar column, keys and shards as Python
strings for the thumbnails) and now (`read_manifest_for_report`: the report's columns).

    python -m benchmarks.report_manifest_memory RUN/manifest.parquet [--rounds 2]

Each read runs in a fresh process; the growth is its VmHWM after the read minus before.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks.procstats import status_kb


def _peak_mb() -> int:
    return status_kb("self", "VmHWM") // 1024


def measure(path: str, how: str) -> dict:
    """In this process: read `path` the `how` way ("all_columns" or "report_columns")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cleaner.selection.manifest import read_manifest_for_report

    before = _peak_mb()
    if how == "all_columns":
        schema = pq.read_schema(path)
        scalar = [f.name for f in schema if not pa.types.is_list(f.type)
                  and not pa.types.is_fixed_size_list(f.type)]  # fmt: skip
        table = pq.read_table(path, columns=scalar)
        keys, shards = table.column("key").to_pylist(), table.column("shard").to_pylist()
        del keys, shards
    else:
        table = read_manifest_for_report(path)
    return {"how": how, "columns": table.num_columns, "rows": table.num_rows,
            "arrow_mb": round(table.nbytes / 2**20), "peak_growth_mb": _peak_mb() - before}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--worker", choices=("all_columns", "report_columns"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.manifest, args.worker)))
        return 0
    print(f"load average {os.getloadavg()[0]:.1f}")
    for _ in range(args.rounds):
        for how in ("all_columns", "report_columns"):
            command = [sys.executable, "-m", "benchmarks.report_manifest_memory", args.manifest,
                       "--worker", how]  # fmt: skip
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            print(out.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
