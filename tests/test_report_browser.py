"""The HTML report as a browser shows it: headless Chromium loads every image."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cleaner.report import render_report, top_noisy_keys
from tests.browser import loaded_images, screenshot
from tests.conftest import jpeg
from tests.test_report import make_manifest, make_summary


def test_report_images_load_in_headless_chromium(tmp_path) -> None:
    manifest = make_manifest(truth=True, probe=True)
    summary = make_summary(manifest)
    summary["mixtures"] = {
        "gmm": "per_class",
        "sources": {
            "zeroshot": {
                "means": [[0.3, 0.9]] * 5,
                "variances": [[0.02, 0.003]] * 5,
                "weights": [[0.4, 0.6]] * 5,
                "degenerate": [False] * 5,
            }
        },
    }
    keys = top_noisy_keys(manifest, 3)
    thumbs = {
        key: jpeg(colour, (48, 48))
        for key, colour in zip(keys, ("red", "green", "blue"), strict=True)
    }
    page = tmp_path / "report.html"
    page.write_text(render_report(manifest, summary, thumbnails=thumbs), encoding="utf-8")

    images = loaded_images(page, tmp_path)
    plots = [im for im in images if im["cls"] == "plot"]
    thumbnails = [im for im in images if im["cls"] == "thumb"]
    assert len(plots) == 4 and len(thumbnails) == 3
    for image in images:  # decoded by the browser: a natural size means it loaded
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, image
    assert all(im["width"] > 300 for im in plots)
    assert all(im["width"] == 48 for im in thumbnails)

    shot = np.asarray(Image.open(screenshot(page, tmp_path / "shot.png")).convert("RGB"))
    assert shot.shape[1] == 1280
    coloured = (shot.max(axis=2).astype(int) - shot.min(axis=2)) > 60
    assert coloured.mean() > 0.005  # plots and thumbnails were painted, not a blank page


def test_a_broken_image_is_caught(tmp_path) -> None:
    """The probe can fail: an <img> whose data is not an image has no natural size."""
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><body><img class="plot" alt="bad" '
        'src="data:image/png;base64,bm90IGFuIGltYWdl"></body></html>',
        encoding="utf-8",
    )
    (image,) = loaded_images(page, tmp_path)
    assert image["width"] == 0
