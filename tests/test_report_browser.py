"""The HTML report in a real headless browser: images load, tables render, figures fit
the page, nothing refers to a missing file.

Needs playwright (the ``test`` extra) and Debian's chromium (``apt-get install -y
chromium``; ``.ci/run`` installs it when missing) or $TOKENCOMPOSE_CHROMIUM; never a
browser download. Without them the test skips and says so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tokencompose_core import storage
from tokencompose_core.reports import RunScores, write_report
from tokencompose_core.sampling import png_bytes

WIDTH = 1280


def _chromium() -> str:
    path = os.environ.get("TOKENCOMPOSE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no chromium: `apt-get install -y chromium` (or set TOKENCOMPOSE_CHROMIUM) to run the browser test")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright missing: `pip install -e '.[test]'` to run the browser test")
    return path


def _run(root: Path, name: str, shift: float) -> RunScores:
    """A run with sample images, an overlay, MultiGen, mIoU, FID, CLIP score and per-prompt values."""
    rows = []
    for prompt_id in range(3):
        for image_index in range(2):
            uri = str(root / name / f"p{prompt_id}_i{image_index}.png")
            storage.atomic_write_bytes(uri, png_bytes(np.full((16, 16, 3), 40 * prompt_id + 20, np.uint8)))
            rows.append((prompt_id, image_index, 0, f"a cat and a dog {prompt_id}", uri, "fp"))
    index_uri = str(root / name / "index.parquet")
    storage.atomic_write_parquet(pd.DataFrame(rows, columns=["prompt_id", "image_index", "seed", "prompt",
                                                             "image_uri", "model_fingerprint"]), index_uri)
    overlay = str(root / name / "overlay.png")
    storage.atomic_write_bytes(overlay, png_bytes(np.zeros((32, 96, 3), np.uint8)))
    table = pd.DataFrame({"mean": [90.0, 50.0 + shift, 20.0, 5.0, 1.0], "std": [1.0] * 5},
                         index=[f"MG{k}" for k in range(1, 6)])
    scores = {"miou_fixed": 30.0 + shift, "miou_best": 35.0 + shift, "best_threshold": 0.4, "fixed_threshold": 0.5,
              "nouns": 4}
    per_unit = pd.DataFrame([(f"prompt {i}", metric, value + shift * (i % 2))
                             for i in range(3) for metric, value in (("coco MG2", 50.0), ("CLIP score", 25.0))],
                            columns=["unit", "metric", "value"])
    return RunScores(multigen={"coco": table}, miou={"groups": {"mid": scores}, "overall": scores},
                     images_per_s=2.0, samples={"coco": index_uri},
                     overlays=[{"title": "cat", "uri": overlay}], fid={"fid": 40.0 - shift},
                     clip={"clip_score": 25.0 + shift}, latency={"seconds_per_image": 0.5, "steps": 4, "batch_size": 4},
                     per_unit=per_unit)


def test_report_renders_in_a_headless_browser(tmp_path: Path) -> None:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    runs = {"base": _run(tmp_path, "base", 0.0), "trained": _run(tmp_path, "trained", 3.0)}
    uris = write_report(runs, str(tmp_path / "report"), pairs={"trained − base": ("base", "trained")},
                        resamples=1000)
    failed: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             args=["--no-sandbox", "--allow-file-access-from-files"])
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 900})
            page.on("requestfailed", lambda request: failed.append(request.url))
            page.on("response", lambda response: failed.append(response.url) if response.status >= 400 else None)
            page.goto(Path(uris["html"]).as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => ({src: e.getAttribute('src'), ok: e.complete && e.naturalWidth > 0,"
                       " right: e.getBoundingClientRect().right, plot: e.classList.contains('plot')}))")
            tables = page.eval_on_selector_all("table", "els => els.map(e => e.querySelectorAll('tbody tr').length)")
            headers = page.eval_on_selector_all("th", "els => els.map(e => e.textContent.trim())")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert failed == [], failed
    assert len(images) == 3 + 2 * (6 + 1)  # intervals, MultiGen, mIoU plots; per run 6 samples + 1 overlay
    assert all(image["ok"] for image in images), [i["src"] for i in images if not i["ok"]]
    assert all(image["right"] <= WIDTH for image in images if image["plot"]), images
    assert tables and all(rows > 0 for rows in tables)
    assert {"FID", "CLIP score", "s/image", "95% interval"} <= set(headers), headers
