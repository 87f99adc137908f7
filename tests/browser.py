"""Render an HTML file in headless Chromium (Debian's package) and report on its images."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
# Without the background-networking flags Chromium keeps trying to reach Google's hosts.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
# Appended to a copy of the page: after load, writes a JSON verdict on every <img>.
IMAGE_PROBE = """
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images).map((img) => ({
    alt: img.alt, cls: img.className, complete: img.complete,
    width: img.naturalWidth, height: img.naturalHeight,
  }));
  const pre = document.createElement("pre");
  pre.id = "image-probe";
  pre.textContent = JSON.stringify(images);
  document.body.appendChild(pre);
});
</script>
"""
PROBE_OUT = re.compile(r'<pre id="image-probe">(.*?)</pre>', re.S)


def chromium() -> str:
    """Path of the Chromium binary; `make test` installs Debian's package when missing."""
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("chromium not found: run `make browser` (apt-get install chromium)")


def _run(args: list[str], profile: Path) -> str:
    command = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def loaded_images(html_path: Path, work: Path) -> list[dict]:
    """Every <img> of the page as Chromium loaded it: alt, class, complete, natural size."""
    probe = work / f"{html_path.stem}-probe.html"
    text = html_path.read_text(encoding="utf-8")
    probe.write_text(text.replace("</body>", IMAGE_PROBE + "</body>"), encoding="utf-8")
    dom = _run(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], work / "profile")
    found = PROBE_OUT.search(dom)
    if found is None:
        raise AssertionError("the image probe did not run: the page did not load")
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def screenshot(html_path: Path, out: Path, width: int = 1280, height: int = 2400) -> Path:
    """A PNG screenshot of the page as rendered."""
    _run(
        [f"--window-size={width},{height}", f"--screenshot={out}", html_path.as_uri()],
        out.parent / "profile-shot",
    )
    return out
