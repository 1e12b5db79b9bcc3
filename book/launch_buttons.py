"""Add Colab launch buttons to the book's configuration, for a build published from a repository.

    python book/launch_buttons.py https://github.com/OWNER/REPO [BRANCH]

Jupyter Book opens ``{repository.url}/blob/{branch}/{path_to_book}/{page}.ipynb`` in Colab. The
chapters' pages are ``notebooks/<chapter>``, executed into ``book/notebooks/``, which is not in git;
with ``path_to_book`` empty the button opens the source notebook, ``notebooks/<chapter>.ipynb``,
instead. The GitHub workflow runs this before ``make book``; a local build has no repository URL
and no buttons.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

CONFIG = Path(__file__).resolve().parent / "_config.yml"
COLAB_URL = "https://colab.research.google.com"


def with_launch_buttons(config: dict, repository_url: str, branch: str = "main") -> dict:
    """``config`` with a repository and a Colab launch button that open the source notebooks."""
    if not repository_url.startswith("https://github.com/"):
        raise ValueError(f"Colab opens notebooks from GitHub: expected https://github.com/OWNER/REPO, "
                         f"got {repository_url!r}")
    return {
        **config,
        "repository": {"url": repository_url.rstrip("/"), "branch": branch, "path_to_book": ""},
        "launch_buttons": {**config.get("launch_buttons", {}), "colab_url": COLAB_URL},
    }


def main(argv: list[str]) -> None:
    if len(argv) not in (1, 2):
        raise SystemExit(__doc__)
    config = yaml.safe_load(CONFIG.read_text())
    CONFIG.write_text(yaml.safe_dump(with_launch_buttons(config, *argv), sort_keys=False, allow_unicode=True))


if __name__ == "__main__":
    main(sys.argv[1:])
