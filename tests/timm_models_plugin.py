"""pytest plugin that runs timm's own ``tests/test_models.py`` on MOAT (see test_timm_contract.py).

Loaded with ``-p timm_models_plugin``, so it runs before the test file is collected: importing
``models`` registers the MOAT family with timm, so timm's ``list_models()`` parametrisation lists
it, exactly as it lists a model added to timm itself. Collection then keeps only the tests whose
``model_name`` is one of ``MOAT_TIMM_TEST_MODELS`` (comma-separated; with any pretrained tag, as
``test_model_default_cfgs`` lists ``name.tag``); timm's filters and limits still decide which
tests a model gets.
"""

import os

import models  # noqa: F401 (registers every MOAT model with timm)


def pytest_collection_modifyitems(config, items) -> None:
    wanted = set(os.environ["MOAT_TIMM_TEST_MODELS"].split(","))
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("model_name") if callspec is not None else None
        (keep if name is not None and name.split(".")[0] in wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
