"""Write the config of this project equivalent to a config file of the unofficial MOAT port or of
the Swin trainer (a shipped YAML or a saved config.json), for those who switch for good.

``main.py --cfg OLD.yaml`` already reads such a file (and logs how); this writes the result once,
with its BASE files merged in, so that the new file says what it means in this project's keys. The
table of mapped keys and the notes go to stderr and, as comments, to the head of the new file. The
output is checked the way ``--cfg`` checks a file; an existing file is never overwritten.

    python tools/migrate_config.py pytorch-MOAT/configs/moat_0.yaml -o configs/my_moat_0.yaml
    python tools/migrate_config.py output/swin_tiny_patch4_window7_224/default/config.json > swin_recipe.yaml
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import migrated_config_tree
from utils.errors import MoatError, UserError


def migrated_yaml(cfg_file: str) -> tuple[str, list[str]]:
    """The YAML text of this project's config equivalent to ``cfg_file`` and the log lines of how
    it was read (empty when ``cfg_file`` is already a config of this project)."""
    tree, migrations = migrated_config_tree(cfg_file)
    notes = [line for m in migrations for line in m.log_lines()]
    head = [f"# Migrated by tools/migrate_config.py from {os.path.basename(cfg_file)}; docs/migrating.md says more."]
    head += [f"# {line}" for note in notes for line in note.splitlines()]
    return "\n".join(head) + "\n" + yaml.safe_dump(tree, sort_keys=False), notes


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("cfg", metavar="OLD.yaml", help="a config file (or saved config.json) of the port or of Swin")
    parser.add_argument("-o", "--output", metavar="NEW.yaml", help="write here (default: standard output)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.output and os.path.exists(args.output):
            raise UserError(f"{args.output} exists; choose another name (an existing file is never overwritten)")
        text, notes = migrated_yaml(args.cfg)
        if not notes:
            print(f"{args.cfg} is already a config of this project; written unchanged in meaning", file=sys.stderr)
        for note in notes:
            print(note, file=sys.stderr)
        if args.output:
            with open(args.output, "x") as f:
                f.write(text)
        else:
            sys.stdout.write(text)
    except MoatError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
