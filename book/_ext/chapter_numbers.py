"""Number figures, tables and exercises per chapter: "Fig. 8.2", "Exercise 3.1".

Sphinx numbers enumerable nodes by section number, and the book's toctree is not numbered (its
chapters carry their numbers in their titles), so without this a reader of chapter 08 meets
"Exercise 20". After Sphinx has assigned its book-wide numbers (``env-get-updated``, priority
500), each page's numbers are renumbered in the same order from 1, prefixed with the chapter number
that its file name starts with (``notebooks/08_comparison`` → 8); pages without one (the Findings,
the methods card) number from 1 alone.
"""

from __future__ import annotations

import re

CHAPTER_FILE = re.compile(r"(?:^|/)(\d+)_[^/]*$")


def chapter_prefix(docname: str) -> tuple[int, ...]:
    """``(8,)`` for ``notebooks/08_comparison``, ``()`` for a page that is not a numbered chapter."""
    match = CHAPTER_FILE.search(docname)
    return (int(match.group(1)),) if match else ()


def renumber(numbers: dict[str, dict[str, tuple[int, ...]]], docname: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """One page's ``{figtype: {node id: number}}`` numbered from 1 per type, in the book-wide order."""
    prefix = chapter_prefix(docname)
    return {figtype: {node: (*prefix, position) for position, node in enumerate(sorted(ids, key=ids.get), 1)}
            for figtype, ids in numbers.items()}


def _per_chapter(app, env) -> list[str]:
    env.toc_fignumbers = {docname: renumber(numbers, docname) for docname, numbers in env.toc_fignumbers.items()}
    return []


def setup(app):
    app.connect("env-get-updated", _per_chapter, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
