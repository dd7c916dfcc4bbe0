"""timm's own model test suite passes on MOAT: ``tests/test_models.py`` of the installed timm's
source distribution, run unchanged on the MOAT models with timm's filters, sizes and limits.

The file is fetched from the package registry (``pip download timm==<installed> --no-binary
:all:``) into a cache folder at test time; this repository holds none of timm's test code. The
one edit is the opt-in a pull request adding a model to timm makes: ``'moat'`` appended to
``FEAT_INTER_FILTERS`` (the model modules whose ``forward_intermediates`` timm tests).
``tests/timm_models_plugin.py`` registers MOAT before collection and keeps only the MOAT tests.

The fast tier runs two models (``tiny_moat_0`` and ``test_moat``, a small custom MoatCfg with
windowed attention, a padded shortcut pool and a stride-1 stage); the slow tier every variant.

No registry (offline, nothing cached): the tests fail, saying so, unless
``MOAT_ALLOW_OFFLINE_SKIP=1`` is set, which turns the failure into a skip. CI never sets it, so a
green CI always ran timm's tests; a developer without network sets it. (The other way round, a
skip unless ``CI`` is set, would let any runner that does not set ``CI`` pass without running
them.) ``MOAT_TIMM_TESTS_CACHE`` overrides the cache folder (default ``~/.cache/moat/timm-tests``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from typing import Dict, List, Tuple

import pytest
import timm

from models import list_variants

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_MODELS = ("tiny_moat_0", "test_moat")
ALL_MODELS = tuple(list_variants()) + ("test_moat",)
# Tests every MOAT model must have run and passed (those this timm version defines): a model
# that silently fell out of timm's parametrisation would otherwise pass by running nothing.
CORE_TESTS = (
    "test_model_forward",
    "test_model_backward",
    "test_model_default_cfgs",
    "test_model_forward_torchscript",
    "test_model_forward_features",
    "test_model_forward_intermediates",
    "test_model_forward_intermediates_features",
    "test_model_forward_fx",
    "test_model_backward_fx",
    "test_model_forward_fx_torchscript",
    "test_prune_intermediate_layers_contract",
)
OPT_IN = "FEAT_INTER_FILTERS += ['moat']  # the opt-in of a model added to timm (MOAT test run)\n"


class FetchError(RuntimeError):
    """The registry could not be reached or gave no usable source distribution."""


def cache_dir() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moat", "timm-tests")
    return os.environ.get("MOAT_TIMM_TESTS_CACHE") or default


def opt_in_moat(source: str) -> str:
    """``source`` (timm's test_models.py) with :data:`OPT_IN` right after ``FEAT_INTER_FILTERS``."""
    lines = source.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("FEAT_INTER_FILTERS = [")), None)
    if start is None:
        raise ValueError("timm's test_models.py has no FEAT_INTER_FILTERS = [...] list to opt MOAT into")
    end = next(i for i in range(start, len(lines)) if lines[i].rstrip().endswith("]"))
    return "".join(lines[: end + 1] + [OPT_IN] + lines[end + 1 :])


def fetch_timm_tests(version: str, cache: str) -> str:
    """Path of timm ``version``'s tests/test_models.py (opted in), fetched once into ``cache``.

    Only ``tests/`` is unpacked (no ``timm/`` beside it), so the tests import the installed timm.
    """
    dest = os.path.join(cache, f"timm-{version}")
    target = os.path.join(dest, "tests", "test_models.py")
    if os.path.isfile(target):
        return target
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"timm=={version}", "--no-binary", ":all:", "--no-deps"]
        cmd += ["--disable-pip-version-check", "--quiet", "--dest", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise FetchError(f"pip download timm=={version} did not finish in 300 s") from None
        if proc.returncode:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
            raise FetchError(f"pip download timm=={version} failed: {lines[-1]}")
        sdists = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")]
        if len(sdists) != 1:
            raise FetchError(f"pip download timm=={version} gave {os.listdir(tmp)}, not one .tar.gz")
        staging = os.path.join(tmp, "unpacked")
        wanted = ("tests/__init__.py", "tests/conftest.py", "tests/test_models.py")
        with tarfile.open(os.path.join(tmp, sdists[0])) as tar:
            for member in tar.getmembers():
                relative = member.name.split("/", 1)[-1]
                if member.isfile() and relative in wanted:
                    path = os.path.join(staging, relative)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with tar.extractfile(member) as src, open(path, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        test_file = os.path.join(staging, "tests", "test_models.py")
        if not os.path.isfile(test_file):
            raise FetchError(f"timm {version}'s source distribution has no tests/test_models.py")
        with open(test_file, encoding="utf-8") as f:
            patched = opt_in_moat(f.read())
        with open(test_file, "w", encoding="utf-8") as f:
            f.write(patched)
        if not os.path.isdir(dest):  # another run may have finished first
            os.replace(staging, dest)
    return target


@pytest.fixture(scope="module")
def timm_test_file() -> str:
    try:
        return fetch_timm_tests(timm.__version__, cache_dir())
    except FetchError as e:
        if os.environ.get("MOAT_ALLOW_OFFLINE_SKIP") == "1":
            # reason: the user opted out of fetching timm's tests (no network); otherwise this fails
            pytest.skip(f"timm's test_models.py not available offline (MOAT_ALLOW_OFFLINE_SKIP=1): {e}")
        pytest.fail(f"{e}; set MOAT_ALLOW_OFFLINE_SKIP=1 to skip timm's model tests without network")


BIG_PARAMS = 100_000_000


def split_by_size(model_names) -> List[List[str]]:
    """Models of more than ``BIG_PARAMS`` parameters (moat_3, moat_4: two thirds of the CPU time;
    timm's pruning test holds several copies of moat_4, gigabytes each) in one group, run one after
    another, the others in a second group beside it: never two big models in memory at once."""
    from models import create_moat

    def params(name: str) -> int:
        return sum(p.numel() for p in create_moat(name, device="meta").parameters())

    big = [n for n in model_names if params(n) > BIG_PARAMS]
    return [g for g in (big, [n for n in model_names if n not in big]) if g]


def run_timm_tests(test_file: str, groups, workdir: str) -> Tuple[Dict[Tuple[str, str], str], str]:
    """Run ``test_file`` on each group of model names in its own pytest process, concurrently (one
    thread each, as the suite sets ``OMP_NUM_THREADS``): ``({(test, model[.tag]): outcome}, output)``."""
    cmd = [sys.executable, "-m", "pytest", test_file, "-p", "timm_models_plugin", "-p", "no:cacheprovider"]
    cmd += ["-q", "-rfEs", "--rootdir", os.path.dirname(os.path.dirname(test_file))]
    cmd += ["-W", "ignore::pytest.PytestUnknownMarkWarning"]  # timm's markers live in its pyproject.toml
    runs = []
    for i, group in enumerate(groups):
        report = os.path.join(workdir, f"report{i}.xml")
        env = dict(os.environ, MOAT_TIMM_TEST_MODELS=",".join(group))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.path.join(REPO, "tests"), env.get("PYTHONPATH")) if p)
        log = open(os.path.join(workdir, f"output{i}.txt"), "w+")
        proc = subprocess.Popen(
            cmd + [f"--junitxml={report}"], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        runs.append((proc, report, log))
    outcomes, output = {}, ""
    for proc, report, log in runs:
        code = proc.wait()
        log.seek(0)
        text = log.read()
        log.close()
        output += text
        if not os.path.isfile(report):
            raise AssertionError(f"timm's tests did not run (exit {code}):\n{text[-4000:]}")
        for case in ET.parse(report).getroot().iter("testcase"):
            match = re.fullmatch(r"(\w+)\[(.+)\]", case.get("name", ""))
            names = [p for p in match.group(2).split("-") if not p.isdigit()] if match else []
            if len(names) != 1:  # ids are model name and batch size, in either order
                continue
            failed = case.find("failure") is not None or case.find("error") is not None
            outcome = "failed" if failed else "skipped" if case.find("skipped") is not None else "passed"
            outcomes[(match.group(1), names[0])] = outcome
    return outcomes, output


def check_all_passed(test_file: str, groups, workdir: str) -> None:
    outcomes, output = run_timm_tests(test_file, groups, workdir)
    model_names = [name for group in groups for name in group]
    with open(test_file, encoding="utf-8") as f:
        defined = set(re.findall(r"^\s*def (test_\w+)\(", f.read(), flags=re.M))
    problems: List[str] = []
    for model in model_names:
        ran = {(test, m): outcome for (test, m), outcome in outcomes.items() if m.split(".")[0] == model}
        problems += [f"{test}[{m}] {outcome}" for (test, m), outcome in sorted(ran.items()) if outcome != "passed"]
        ran_tests = {test for test, _ in ran}
        problems += [f"{test}[{model}] did not run" for test in CORE_TESTS if test in defined and test not in ran_tests]
    assert not problems, "timm's test_models.py on MOAT:\n" + "\n".join(problems) + "\n\n" + output[-6000:]


def test_opt_in_goes_right_after_the_feat_inter_filters_list():
    source = "A = 1\nFEAT_INTER_FILTERS = [\n    'vit', 'resnet',\n]\nB = 2\n"
    patched = opt_in_moat(source)
    assert patched == "A = 1\nFEAT_INTER_FILTERS = [\n    'vit', 'resnet',\n]\n" + OPT_IN + "B = 2\n"
    namespace: dict = {}
    exec(patched, namespace)
    assert namespace["FEAT_INTER_FILTERS"] == ["vit", "resnet", "moat"]
    with pytest.raises(ValueError, match="FEAT_INTER_FILTERS"):
        opt_in_moat("A = 1\n")


def test_the_cache_is_used_and_an_unreachable_registry_is_a_fetch_error(tmp_path, monkeypatch):
    cached = tmp_path / "timm-9.9.9" / "tests" / "test_models.py"
    cached.parent.mkdir(parents=True)
    cached.write_text("FEAT_INTER_FILTERS = []\n")
    assert fetch_timm_tests("9.9.9", str(tmp_path)) == str(cached)  # no registry asked
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as offline: pip finds no distribution
    with pytest.raises(FetchError, match="pip download timm==9.9.8 failed"):
        fetch_timm_tests("9.9.8", str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["timm-9.9.9"]  # nothing half-written left


def test_timm_model_tests_pass_on_tiny_moat_and_a_custom_moat(timm_test_file, tmp_path):
    check_all_passed(timm_test_file, [list(FAST_MODELS)], str(tmp_path))


@pytest.mark.slow
def test_timm_model_tests_pass_on_every_moat_variant(timm_test_file, tmp_path):
    # About 10 CPU minutes, two thirds of them in the big group: ~7 minutes on 2 idle cores.
    check_all_passed(timm_test_file, split_by_size(ALL_MODELS), str(tmp_path))


def test_big_models_are_grouped_apart_from_the_others():
    big, small = split_by_size(ALL_MODELS)
    assert sorted(big) == ["moat_3", "moat_3_no_pe", "moat_4", "moat_4_no_pe"]
    assert sorted(big + small) == sorted(ALL_MODELS)
    assert split_by_size(["tiny_moat_0", "test_moat"]) == [["tiny_moat_0", "test_moat"]]
