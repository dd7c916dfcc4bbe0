"""Mixed precision: pick the autocast dtype once, and a loss scaler that owns
backward + unscale + clip + step (so the training loop has no AMP branches)."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, ContextManager, Iterable, Optional

import torch

from . import UserError


def apex_available() -> bool:
    try:
        import apex.amp  # noqa: F401 (only checks that apex is installed)
    except ImportError:
        return False
    return True


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bf16 kernels (AVX512-BF16/AMX); elsewhere bf16 on CPU is
    emulated and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_amx() -> bool:
    """True on CPUs with AMX tiles (Intel Sapphire Rapids and later), where oneDNN's bf16
    convolutions outrun fp32 in training too."""
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch >= 2.5
    try:
        return bool(is_amx()) if is_amx is not None else False
    except RuntimeError:
        return False


def resolve_amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """Config ``AMP`` -> autocast dtype (None = full precision)."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # AVX512-BF16 without AMX has bf16 kernels, but MOAT trains slower with them than in
        # fp32 (its depthwise and 1x1 convolution backward passes run 2-5x slower; see
        # docs/benchmarks.md), so 'auto' asks for AMX. --amp bf16 still forces it.
        return torch.bfloat16 if cpu_supports_bf16() and cpu_has_amx() else None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def autocast_factory(device: torch.device, dtype: Optional[torch.dtype]) -> Callable[[], ContextManager]:
    """A zero-argument context factory, chosen once: autocast or a no-op."""
    if dtype is None:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


class NativeScaler:
    """``torch.amp.GradScaler`` when training in fp16; a pass-through otherwise (bf16/fp32 need
    no loss scaling). ``step`` unscales, clips the full (accumulated) gradient and returns its norm."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.enabled = enabled
        self._scaler = torch.amp.GradScaler(device.type, enabled=enabled)

    def backward(self, loss: torch.Tensor, update: bool = True) -> None:
        self._scaler.scale(loss).backward()

    def step(
        self, optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor], clip_grad: float
    ) -> torch.Tensor:
        self._scaler.unscale_(optimizer)
        # max_norm=inf still returns the norm, so it is logged with clipping off.
        norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad if clip_grad > 0 else math.inf)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def get_scale(self) -> float:
        """Host sync when enabled: call at log steps only."""
        return self._scaler.get_scale() if self.enabled else 1.0

    def state_dict(self) -> dict:
        return self._scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._scaler.load_state_dict(state)


class ApexScaler:
    """NVIDIA apex AMP (legacy ``--amp-opt-level``); same interface as ``NativeScaler``."""

    def __init__(self) -> None:
        from apex import amp

        self._amp = amp
        self.enabled = True

    def backward(self, loss: torch.Tensor, update: bool = True) -> None:
        # Keep the gradient scaled across accumulation micro-steps; unscale on the update step.
        with self._amp.scale_loss(loss, self._optimizer, delay_unscale=not update) as scaled:
            scaled.backward()

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer

    def step(
        self, optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor], clip_grad: float
    ) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(
            self._amp.master_params(optimizer), clip_grad if clip_grad > 0 else math.inf
        )
        optimizer.step()
        return norm

    def get_scale(self) -> float:
        return float(self._amp._amp_state.loss_scalers[0].loss_scale())

    def state_dict(self) -> dict:
        return self._amp.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._amp.load_state_dict(state)


def build_scaler(config, device: torch.device, amp_dtype: Optional[torch.dtype], model, optimizer):
    """The loss scaler for this run; with apex, also ``amp.initialize`` the model and optimizer.

    Returns ``(scaler, model, optimizer)``.
    """
    if config.AMP_OPT_LEVEL:
        if not apex_available():
            raise UserError(
                "AMP_OPT_LEVEL / --amp-opt-level needs NVIDIA apex, which is not "
                "installed; use --amp {off,fp16,bf16} (torch.amp) instead"
            )
        if device.type != "cuda":
            raise UserError("NVIDIA apex AMP (--amp-opt-level) runs on CUDA only")
        from apex import amp

        model, optimizer = amp.initialize(model, optimizer, opt_level=config.AMP_OPT_LEVEL)
        scaler = ApexScaler()
        scaler.attach(optimizer)
        return scaler, model, optimizer
    return NativeScaler(device, enabled=amp_dtype == torch.float16), model, optimizer
