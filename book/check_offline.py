"""Fail if the built HTML loads anything from the network (math must render offline).

    python book/check_offline.py book/_build/html
"""

import re
import sys
from pathlib import Path

REMOTE = re.compile(r"""<(?:script|link|img)\b[^>]*\b(?:src|href)=["'](?:https?:)?//""", re.I)


def remote_assets(html_dir: Path) -> list[str]:
    found = []
    for page in sorted(html_dir.rglob("*.html")):
        for match in REMOTE.finditer(page.read_text(errors="replace")):
            found.append(f"{page.relative_to(html_dir)}: {match.group(0)}")
    return found


def is_built(html_dir: Path) -> bool:
    """Whether ``html_dir`` holds a built book; if not, say on stderr how to build one."""
    if (html_dir / "index.html").exists():
        return True
    print(f"no built book in {html_dir}; run 'make book' first", file=sys.stderr)
    return False


def report(check: str, found: list[str], ok: str) -> int:
    """Each problem ``found`` on stderr, then one summary line for ``check``; the exit status. The
    book's checks (this one, ``check_pages.py``, ``check_browser.py``) all end with it."""
    for line in found:
        print(line, file=sys.stderr)
    print(f"{check}: " + (ok if not found else f"FAILED ({len(found)} problems)"))
    return 0 if not found else 1


def main() -> int:
    html_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "book/_build/html")
    if not is_built(html_dir):
        return 1
    found = [f"remote asset: {line}" for line in remote_assets(html_dir)]
    if not list(html_dir.glob("_static/mathjax/tex-chtml.js")):
        found.append("MathJax is not bundled in _static/mathjax/")
    return report("offline check", found, "ok, no remote scripts, styles or images; MathJax bundled")


if __name__ == "__main__":
    sys.exit(main())
