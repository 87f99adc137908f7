"""How long a clean run's HTML report takes to open in headless Chromium, and a screenshot:

    python -m benchmarks.report_render RUN/report.html [--screenshot FILE.png]
        [--rounds 3] [--out FILE.json]

Per round, a fresh headless Chromium (Debian's package, `make browser`) opens a copy of the
report with a probe appended that reads the page's own navigation timing after the load
event: `dom_content_loaded_ms` and `load_ms` (from navigation start: parsing, styles,
the inline images and scripts). `wall_s` is the whole browser process (start-up
included). The median of the rounds is printed with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tests.browser import _run, screenshot

TIMING_PROBE = """
<script>
window.addEventListener("load", () => setTimeout(() => {
  const nav = performance.getEntriesByType("navigation")[0];
  const pre = document.createElement("pre");
  pre.id = "timing-probe";
  pre.textContent = JSON.stringify({
    dom_content_loaded_ms: nav.domContentLoadedEventEnd, load_ms: nav.loadEventEnd,
    elements: document.getElementsByTagName("*").length,
  });
  document.body.appendChild(pre);
}, 0));
</script>
"""
PROBE_OUT = re.compile(r'<pre id="timing-probe">(.*?)</pre>', re.S)


def open_once(report: Path, work: Path) -> dict:
    """One fresh browser: the page's navigation timing and the process's wall time."""
    work.mkdir(parents=True, exist_ok=True)
    probe = work / "report-timing.html"
    text = report.read_text(encoding="utf-8")
    probe.write_text(text.replace("</body>", TIMING_PROBE + "</body>"), encoding="utf-8")
    start = time.perf_counter()
    dom = _run(["--virtual-time-budget=30000", "--dump-dom", probe.as_uri()], work / "profile")
    wall = time.perf_counter() - start
    found = PROBE_OUT.search(dom)
    if found is None:
        raise RuntimeError("the timing probe did not run: the page did not load")
    return {**json.loads(found.group(1).replace("&quot;", '"')), "wall_s": round(wall, 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--screenshot", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2000)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="report-render-") as work:
        for i in range(args.rounds):
            rounds.append(open_once(args.report, Path(work) / str(i)))
            print(f"round {i + 1}: {rounds[-1]}", flush=True)
    result = {
        "report": str(args.report),
        "report_bytes": args.report.stat().st_size,
        "rounds": rounds,
        "median": {
            name: statistics.median(r[name] for r in rounds)
            for name in ("dom_content_loaded_ms", "load_ms", "wall_s")
        },
        "load_average": os.getloadavg(),
    }
    if args.screenshot:  # taken in a temp folder (Chromium's profile goes beside it)
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="report-shot-") as work:
            shot = screenshot(args.report, Path(work) / "shot.png", args.width, args.height)
            shutil.copyfile(shot, args.screenshot)
        result["screenshot"] = str(args.screenshot)
    median = result["median"]
    print(
        f"{args.report} ({result['report_bytes'] / 2**20:.2f} MB), median of {args.rounds}: "
        f"loaded in {median['load_ms'] / 1000:.2f} s (DOM ready {median['dom_content_loaded_ms'] / 1000:.2f}"
        f" s), browser process {median['wall_s']:.1f} s; load average {result['load_average'][0]:.1f}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
