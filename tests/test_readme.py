"""The README keeps its promises: the model table is the code's, and named files and flags exist."""

import os
import re

from conftest import REPO

README = open(os.path.join(REPO, "README.md")).read()


def test_model_table_is_generated_from_the_code():
    from tools.model_table import model_table, replace_in

    assert replace_in(README, model_table()) == README, "run: python tools/model_table.py --write README.md"


def test_files_named_in_the_readme_exist():
    paths = set(re.findall(r"\b((?:configs|tools|benchmarks|docs)/[\w./-]+\.(?:yaml|py|md))", README))
    assert paths
    assert [p for p in paths if not os.path.exists(os.path.join(REPO, p))] == []


def test_main_flags_named_in_the_readme_exist():
    from main import get_args_parser

    known = {s for a in get_args_parser()._actions for s in a.option_strings}
    used = set()
    for line in README.splitlines():
        if "main.py" in line or line.startswith("    ") or line.startswith("Useful flags"):
            used |= set(re.findall(r"(?<![\w-])(--[a-z][a-z_-]+)", line))
    launcher_flags = {
        "--nproc_per_node",
        "--nnodes",
        "--rdzv-backend",
        "--rdzv-endpoint",
        "--rdzv-id",
        "--index-url",
        "--logdir",
        "--write",
    }
    assert sorted(used - known - launcher_flags) == []
