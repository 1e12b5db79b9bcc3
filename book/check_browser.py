"""Open the built book in headless Chromium as a reader would, at 1024 px: fail if a table of the
front page or the Findings runs past the text column (its grades off-screen), a chapter's shown code
cell scrolls sideways (its line ends hidden) or an image of any page does not load; save a
screenshot of each page's first screen. (A chapter's wide data table may scroll.)

    python book/check_browser.py book/_build/html [--width 1024] [--screenshots DIR]

The measuring happens in the page itself (``_static/robustq-check.js``, active only with
``?robustq-check`` in the address). Chromium comes from Debian (``apt-get install
chromium-headless-shell``; ``make book`` installs it when it runs as root with apt); without it the
check says so and is skipped, since the static checks (``check_pages.py``) still run.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from check_offline import is_built, report  # book/, beside this script

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
RESULT = re.compile(r'<pre id="robustq-check"[^>]*>(.*?)</pre>', re.S)
TIMEOUT_S = 120


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


SUMMARIES = ("intro.html", "findings.html")  # their tables must fit: a reader reads the grades there


def pages(html_dir: Path) -> list[Path]:
    """The pages a reader opens: the front page, the Findings and every chapter."""
    return [*(html_dir / name for name in SUMMARIES), *sorted((html_dir / "notebooks").glob("*.html"))]


def _chromium(browser: str, width: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files",
         f"--window-size={width},900", "--virtual-time-budget=10000", *args],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )


def page_problems(browser: str, page: Path, width: int) -> list[str]:
    """What the page's own check found at ``width`` px, one line each."""
    checks = "tables,images" if page.name in SUMMARIES else "code,images"
    done = _chromium(browser, width, "--dump-dom", f"{page.resolve().as_uri()}?robustq-check={checks}")
    found = RESULT.search(done.stdout)
    if found is None:
        return [f"the page check did not run (is _static/robustq-check.js in the build?): {done.stderr.strip()[-300:]}"]
    return json.loads(html.unescape(found.group(1)))


def screenshot(browser: str, page: Path, width: int, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{page.stem}-{width}.png"
    _chromium(browser, width, f"--screenshot={target}", page.resolve().as_uri())
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", nargs="?", default="book/_build/html", type=Path)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--screenshots", type=Path, default=Path("book/_build/screenshots"))
    args = parser.parse_args()
    if not is_built(args.html_dir):
        return 1
    browser = find_browser()
    if browser is None:
        print("browser check: SKIPPED, no headless Chromium (apt-get install chromium-headless-shell)")
        return 0
    problems = []
    for page in pages(args.html_dir):
        problems += [f"{page.relative_to(args.html_dir)} at {args.width} px: {line}"
                     for line in page_problems(browser, page, args.width)]
        screenshot(browser, page, args.width, args.screenshots)
    return report(f"browser check ({Path(browser).name}, {args.width} px)", problems,
                  f"ok, no table past the text column, no shown code cell scrolls sideways, every image loads; "
                  f"first screens in {args.screenshots}")


if __name__ == "__main__":
    sys.exit(main())
