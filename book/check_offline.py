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


def main() -> int:
    html_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "book/_build/html")
    if not (html_dir / "index.html").exists():
        print(f"no built book in {html_dir}; run 'make book' first", file=sys.stderr)
        return 1
    found = remote_assets(html_dir)
    for line in found:
        print(f"remote asset: {line}", file=sys.stderr)
    mathjax = list(html_dir.glob("_static/mathjax/tex-chtml.js"))
    if not mathjax:
        print("MathJax is not bundled in _static/mathjax/", file=sys.stderr)
    ok = not found and bool(mathjax)
    print("offline check: " + ("ok, no remote scripts, styles or images; MathJax bundled" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
