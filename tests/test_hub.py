"""hubconf.py: one entry per variant, and torch.hub.load(..., source='local', weights=...) returns
the trained model in eval mode."""

import importlib.util
import os

import pytest
import torch

from inference_helpers import REPO, VARIANT, make_checkpoint, reference_model
from models import list_variants
from utils.errors import UserError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("hub") / "ckpt.pth"))


def test_every_variant_is_a_hub_entry():
    # What torch.hub.list does after fetching a repo (this torch's list() only takes GitHub
    # repos): import hubconf.py and keep its public callables.
    spec = importlib.util.spec_from_file_location("hubconf", os.path.join(REPO, "hubconf.py"))
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    entries = sorted(n for n in dir(hub) if callable(getattr(hub, n)) and not n.startswith("_"))
    assert entries == sorted(list_variants() + ["moat_from_checkpoint"])
    assert hub.dependencies == ["torch", "timm"]


def test_local_hub_load_returns_the_trained_model_in_eval_mode(checkpoint):
    model = torch.hub.load(REPO, VARIANT, source="local", weights=checkpoint)
    assert not model.training and model.num_classes == 3
    assert model.moat_meta.class_names == ["red", "green", "blue"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference_model(checkpoint)(x))  # EMA weights by default
    raw = torch.hub.load(REPO, VARIANT, source="local", weights=checkpoint, use_ema=False)
    want = torch.load(checkpoint, weights_only=True)["model"]
    assert all(torch.equal(raw.state_dict()[k], v) for k, v in want.items())


def test_hub_entry_of_another_variant_refuses_the_weights(checkpoint):
    with pytest.raises(UserError, match="wrong variant"):
        torch.hub.load(REPO, "tiny_moat_1", source="local", weights=checkpoint)


def test_without_weights_kwargs_go_to_the_model_and_pretrained_needs_weights():
    model = torch.hub.load(REPO, "tiny_moat_0_no_pe", source="local", num_classes=5)
    assert model.num_classes == 5
    with pytest.raises(UserError, match="no published PyTorch weights"):
        torch.hub.load(REPO, VARIANT, source="local", pretrained=True)
