"""The mutation score of the last `mutmut run` (`make mutate`, docs/testing.md).

    python -m tests.mutation_score [--survivors]

Reads mutmut's per-file results (mutants/<module>.py.meta), prints killed / survived per
module and, last, `mutation score: K killed of N (P%)`. A mutant counts as killed when a
test failed on it or it made the tests hang (mutmut's timeout); every other outcome
(survived, no test ran it, not checked) counts against the score. `--survivors` lists each
surviving mutant with its diff (for the list in docs/testing.md). Exit status 1 when a
mutant was left unchecked (an interrupted run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

DETECTED = {"killed", "timeout", "caught by type check"}


def results(root: Path = Path("mutants")) -> dict[str, dict[str, str]]:
    """{source file: {mutant name: status}} from mutmut's .meta files."""
    found = {}
    for meta in sorted(root.rglob("*.py.meta")):
        exit_codes = json.loads(meta.read_text())["exit_code_by_key"]
        if exit_codes:
            source = str(meta.relative_to(root)).removesuffix(".meta")
            found[source] = {k: status_by_exit_code[code] for k, code in exit_codes.items()}
    return found


def survivor_diff(name: str) -> str:
    """mutmut's diff of one mutant against the source."""
    shown = subprocess.run(
        [sys.executable, "-m", "mutmut", "show", name], capture_output=True, text=True
    )
    return shown.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", action="store_true", help="list every undetected mutant")
    args = parser.parse_args(argv)
    by_file = results()
    if not by_file:
        print("no mutmut results under mutants/: run `make mutate`", file=sys.stderr)
        return 1
    killed = total = 0
    unchecked = 0
    for source, statuses in by_file.items():
        counts = Counter(statuses.values())
        detected = sum(n for status, n in counts.items() if status in DETECTED)
        killed, total = killed + detected, total + len(statuses)
        unchecked += counts["not checked"]
        others = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if s not in DETECTED)
        print(
            f"{source}: {detected} killed of {len(statuses)}" + (f" ({others})" if others else "")
        )
        if args.survivors:
            for name, status in statuses.items():
                if status not in DETECTED:
                    print(f"\n[{status}] {name}\n{survivor_diff(name)}\n")
    if unchecked:
        print(f"{unchecked} mutants were not checked (an interrupted run?)", file=sys.stderr)
    print(f"mutation score: {killed} killed of {total} ({100.0 * killed / total:.1f}%)")
    return 1 if unchecked else 0


if __name__ == "__main__":
    sys.exit(main())
