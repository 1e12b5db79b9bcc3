"""Fail if a built page shows a reader raw output: "NaN" or a Python object's repr in a table or a
cell's output, the build machine's absolute path, an image that does not load, or an exercise
numbered across the book.

    python book/check_pages.py book/_build/html

Only what the reader sees is checked: the text of the pages, without the code cells' sources (a
chapter's code may well say ``math.nan``), scripts and styles; prose may name NaN.
"""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

from check_offline import is_built, report  # book/, beside this script

ROOT = Path(__file__).resolve().parents[1]
RAW = {
    "a NaN": re.compile(r"\b(?:NaN|nan)\b"),
    "a Python repr": re.compile(r"\b(?:PosixPath|WindowsPath)\(|<[\w.]+ object at 0x"),
    "a training log": re.compile(r"\bepoch \d+/\d+\s+loss\b"),
    "a negative zero": re.compile(r"(?<![\w.])-0\.0+(?![\d.])"),
}
EXERCISE = re.compile(r"Exercise (\d+)(?:\.(\d+))?")
CHAPTER_PAGE = re.compile(r"(?:^|/)(\d+)_[^/]*\.html$")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
HIDDEN = {"script", "style"}


class _Page(HTMLParser):
    """The visible text of a page (code cell sources left out) and its images' sources."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[tuple[str, bool, bool]] = []  # (tag, hides its text, is output)
        self.text: list[str] = []
        self.output: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img" and attrs.get("src"):
            self.images.append(attrs["src"])
        if tag in VOID:
            return
        classes = (attrs.get("class") or "").split()
        self.open.append((tag, tag in HIDDEN or "cell_input" in classes,
                          tag in ("td", "th") or "cell_output" in classes))

    def handle_endtag(self, tag):
        for depth in range(len(self.open) - 1, -1, -1):  # tolerate unclosed tags inside
            if self.open[depth][0] == tag:
                del self.open[depth:]
                return

    def handle_data(self, data):
        if not any(hides for _, hides, _ in self.open):
            self.text.append(data)
            if any(output for _, _, output in self.open):
                self.output.append(data)


def page_problems(page: Path, html_dir: Path, build_root: Path = ROOT) -> list[str]:
    """What is wrong on one built page, one line each."""
    parser = _Page()
    parser.feed(page.read_text(errors="replace"))
    text, output = " ".join(parser.text), " ".join(parser.output)
    name = page.relative_to(html_dir).as_posix()
    problems = [f"{name}: {what}: ...{_around(output, m)}..." for what, pattern in RAW.items()
                for m in pattern.finditer(output)]
    if str(build_root) in text:
        problems.append(f"{name}: the build machine's path {build_root}: ...{_around(text, re.search(re.escape(str(build_root)), text))}...")
    problems += [f"{name}: image does not load: {src}" for src in parser.images if not _loads(src, page)]
    chapter = CHAPTER_PAGE.search(name)
    if chapter:
        wrong = {m.group(0) for m in EXERCISE.finditer(text) if int(m.group(1)) != int(chapter.group(1)) or not m.group(2)}
        problems += [f"{name}: {label} is not numbered within chapter {int(chapter.group(1))}" for label in sorted(wrong)]
    return problems


def _around(text: str, match: re.Match) -> str:
    return " ".join(text[max(0, match.start() - 60):match.end() + 40].split())


def _loads(src: str, page: Path) -> bool:
    url = urlparse(src)
    if url.scheme in ("data", "http", "https"):  # remote ones are check_offline.py's business
        return True
    return (page.parent / unquote(url.path)).is_file()


def problems(html_dir: Path, build_root: Path = ROOT) -> list[str]:
    pages = [p for p in sorted(html_dir.rglob("*.html")) if not p.relative_to(html_dir).parts[0].startswith("_")]
    return [line for page in pages for line in page_problems(page, html_dir, build_root)]


def main() -> int:
    html_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "book/_build/html")
    if not is_built(html_dir):
        return 1
    return report("page check", problems(html_dir), "ok, no NaN, absolute path or repr on a page; every image "
                  "loads; exercises numbered per chapter")


if __name__ == "__main__":
    sys.exit(main())
