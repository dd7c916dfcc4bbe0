"""Print the README's model table (variant, parameters, input size, published top-1) from the code.

The README embeds this output between ``<!-- model-table:start -->`` and ``<!-- model-table:end -->``;
``tests/test_readme.py`` fails when the two drift apart. Refresh with
``python tools/model_table.py --write README.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from models import MOAT_CFGS, create_moat
from models.moat import DEFAULT_IMG_SIZE, PUBLISHED_TOP1

START, END = "<!-- model-table:start -->", "<!-- model-table:end -->"


def model_table() -> str:
    """Markdown table of every variant; parameters counted on the meta device (no memory)."""
    rows = [
        "| variant | params (1000 classes) | default drop path | input size | published top-1 (IN-1k) |",
        "|---|---:|---:|---|---|",
    ]
    for name, cfg in MOAT_CFGS.items():
        with torch.device("meta"):
            model = create_moat(name)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        size = DEFAULT_IMG_SIZE[name]
        top1 = f"{PUBLISHED_TOP1[name]:.1f} @ {size}" if name in PUBLISHED_TOP1 else "—"
        rows.append(f"| `{name}` | {params:,} | {cfg.drop_path_rate} | any multiple of 32 (default {size}) | {top1} |")
    return "\n".join(rows) + "\n"


def replace_in(text: str, table: str) -> str:
    """``text`` with the block between the markers replaced by ``table``."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"markers {START} ... {END} not found")
    return pattern.sub(lambda _: f"{START}\n{table}{END}", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="README", help="rewrite the table inside this file")
    args = parser.parse_args()
    table = model_table()
    if args.write:
        with open(args.write) as f:
            text = f.read()
        with open(args.write, "w") as f:
            f.write(replace_in(text, table))
    else:
        print(table, end="")


if __name__ == "__main__":
    main()
