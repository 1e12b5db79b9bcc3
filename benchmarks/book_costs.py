"""Where a built book's time went, from what the build left behind (nothing is rerun): each executed
chapter's costliest cells (papermill's own duration of every cell, ``book/notebooks/*.ipynb``) and
each method's training in the experiment cache (``train_time_s`` of every ``result.json``: the
grid's models, trained two at a time, and the notebooks' own). It is the table to read before
cutting an analysis for time: the book's 30-minute goal (issue #25) asks what each costs.

    .venv/bin/python benchmarks/book_costs.py [--notebooks book/notebooks] [--cache .cache/robustq]
                                              [--top 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def cell_seconds(notebook: Path) -> pd.DataFrame:
    """One row per code cell of an executed notebook: its index, papermill's duration in seconds
    and the first line of its source."""
    cells = json.loads(notebook.read_text())["cells"]
    rows = [{"chapter": notebook.stem, "cell": index,
             "seconds": cell.get("metadata", {}).get("papermill", {}).get("duration") or 0.0,
             "source": next((line.strip() for line in cell["source"] if line.strip()), "")[:70]}
            for index, cell in enumerate(cells) if cell["cell_type"] == "code"]
    return pd.DataFrame(rows)


def training_seconds(cache: Path) -> pd.DataFrame:
    """Per method and recipe size (the profile's training subset), how many models the cache holds,
    their total and mean training seconds, and how many trained beside another."""
    rows = []
    for path in cache.glob("*/result.json"):
        record = json.loads(path.read_text())
        rows.append({"method": record["config"]["method"], "train_size": record["config"]["train_size"],
                     "seconds": record["metrics"]["train_time_s"],
                     "beside another": record["metrics"].get("jobs_at_once", 1) > 1})
    frame = pd.DataFrame(rows)
    return (frame.groupby(["method", "train_size"])
            .agg(models=("seconds", "size"), total_s=("seconds", "sum"), mean_s=("seconds", "mean"),
                 beside_another=("beside another", "sum"))
            .sort_values("total_s", ascending=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notebooks", type=Path, default=ROOT / "book" / "notebooks")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "robustq")
    parser.add_argument("--top", type=int, default=8, help="cells shown per chapter")
    args = parser.parse_args()
    notebooks = sorted(args.notebooks.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise SystemExit(f"no executed chapter in {args.notebooks}: run `make book` first, or pass --notebooks")
    cells = pd.concat([cell_seconds(notebook) for notebook in notebooks], ignore_index=True)
    with pd.option_context("display.width", 140, "display.max_colwidth", 70, "display.max_rows", 500):
        print("seconds per chapter (cells):")
        print(cells.groupby("chapter")["seconds"].sum().round(1).to_string(), "\n")
        print(f"the {args.top} costliest cells of each chapter:")
        top = cells.sort_values("seconds", ascending=False).groupby("chapter", sort=True).head(args.top)
        print(top.sort_values(["chapter", "seconds"], ascending=[True, False]).round(1).to_string(index=False), "\n")
        if args.cache.is_dir():
            print(f"training in {args.cache} (train_time_s of every model, the grid's two at a time):")
            print(training_seconds(args.cache).round(1).to_string())


if __name__ == "__main__":
    main()
