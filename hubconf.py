"""torch.hub entry points: one per MOAT variant (``torch.hub.list(repo_dir, source='local')``),
and ``moat_from_checkpoint`` for whatever architecture a file records (custom ones included).

    model = torch.hub.load(repo_dir, 'moat_0', source='local', weights='best.pth')
    model = torch.hub.load(repo_dir, 'moat_from_checkpoint', source='local', weights='my_moat.pth')

``weights`` is a trainer checkpoint or a safetensors file from ``tools/export.py``; the model
comes back in eval mode with those weights (EMA when the checkpoint has them, unless
``use_ema=False``), its head sized from the weights, and ``model.moat_meta`` holding the class
names and preprocessing (``data.transforms.build_transform(False, model.moat_meta.config)`` gives the
eval transform). Without ``weights`` the model is randomly initialised and the keyword arguments go
to the model (``num_classes=10``, ``drop_path_rate=0.1``, ...). No PyTorch weights are published
for MOAT, so ``pretrained=True`` needs ``weights``.
"""

import torch as _torch

dependencies = ["torch", "timm"]

# Entries are generated, so everything else here is private (torch.hub.list shows every public
# callable of this module).
import models as _models
from checkpoints import load_for_inference as _load
from utils.errors import UserError as _UserError


def _entry(variant: str):
    def entry(pretrained: bool = False, weights: str = None, **kwargs) -> _torch.nn.Module:
        if weights is None:
            if pretrained:
                raise _UserError(
                    f"no published PyTorch weights for {variant}; pass weights=<trainer checkpoint or .safetensors>"
                )
            return _models.create_moat(variant, **kwargs)
        options = {k: kwargs.pop(k) for k in ("device", "use_ema") if k in kwargs}
        if kwargs:
            raise _UserError(f"with weights=, only device= and use_ema= are accepted; got {', '.join(sorted(kwargs))}")
        model, meta = _load(weights, variant=variant, **options)
        model.moat_meta = meta
        return model

    entry.__name__ = entry.__qualname__ = variant
    entry.__doc__ = (
        f"MOAT variant {variant}: weights=<checkpoint or .safetensors> loads trained "
        f"weights (eval mode); without weights, a random init with kwargs to the model."
    )
    return entry


def moat_from_checkpoint(weights: str, device: str = "cpu", use_ema: bool = None) -> _torch.nn.Module:
    """The model a trainer checkpoint or exported .safetensors file holds, whatever its
    architecture (recorded in the file), in eval mode with ``model.moat_meta``."""
    model, meta = _load(weights, device=device, use_ema=use_ema)
    model.moat_meta = meta
    return model


for _variant in _models.list_variants():
    globals()[_variant] = _entry(_variant)
del _variant
