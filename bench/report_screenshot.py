"""Render a `poft report` report.html in headless Chromium and save a PNG of the page.

    python bench/report_screenshot.py --html poft-report/report.html --png report.png
    python bench/report_screenshot.py --png report.png   # first writes a report over synthetic scored data

Without --html it builds a scored dataset (two references on different scales, a quarter of the rows
noisy, one row unscored, one reply holding HTML and markdown) and runs `poft report` on it. Chromium
runs with the network and background services off: the page must draw from the file alone.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from poft.cli import main as poft_main
from poft.schema import conversation_id

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def synthetic_report(directory: Path, rows: int = 200) -> Path:
    from datasets import Dataset

    rng = random.Random(0)
    conversations, noisy, a, b = [], [], [], []
    for i in range(rows):
        x, y = rng.randint(0, 99), rng.randint(0, 99)
        bad = i % 4 == 0
        answer = f"{x} plus {y} is {x + y + (rng.randint(1, 9) if bad else 0)}."
        if i == 3:
            answer = "<script>alert('x')</script> **not bold** [not a link](http://example.com) | a & b " * 3
        conversations.append(
            [{"role": "user", "content": f"What is {x} plus {y}?"}, {"role": "assistant", "content": answer}]
        )
        noisy.append(bad)
        base = rng.gauss(-1.0, 0.5) - (2.5 if bad else 0.0)
        a.append(base + rng.gauss(0, 0.3))
        b.append(0.5 * base - 0.4 + rng.gauss(0, 0.4))
    a[7] = None
    ref = [None if s is None else (s + t) / 2 for s, t in zip(a, b, strict=True)]
    Dataset.from_dict(
        {
            "messages": conversations,
            "poft_id": [conversation_id(c) for c in conversations],
            "score_small": a,
            "score_large": b,
            "ref_score": ref,
            "poft_noise": noisy,
        }
    ).save_to_disk(str(directory / "scored"))
    if poft_main(["report", "--scored", str(directory / "scored"), "--output", str(directory / "report")]) != 0:
        sys.exit("poft report failed")
    return directory / "report" / "report.html"


def screenshot(html: Path, png: Path, width: int, height: int) -> None:
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        sys.exit("No Chromium found: install it (e.g. `apt-get install -y chromium`) and run again.")
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
        f"--screenshot={png.resolve()}",
        html.resolve().as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or not png.is_file():
        sys.exit(f"Chromium failed ({result.returncode}): {result.stderr.strip()[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, help="report.html to render (default: one over synthetic data)")
    parser.add_argument("--png", type=Path, default=Path("report.png"), help="where to save the screenshot")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=7000, help="the page is cut at this height")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        html = args.html or synthetic_report(Path(tmp))
        screenshot(html, args.png, args.width, args.height)
    print(f"Wrote {args.png} ({args.png.stat().st_size} bytes) from {html}")


if __name__ == "__main__":
    main()
