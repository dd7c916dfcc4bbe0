"""Which autocast dtype ``AMP`` resolves to per device."""

from __future__ import annotations

import pytest
import torch

from utils import amp


@pytest.mark.parametrize(
    "bf16_kernels, amx, expected",
    [(False, False, None), (True, False, None), (True, True, torch.bfloat16)],
    ids=["avx2", "avx512-bf16-no-amx", "amx"],
)
def test_auto_on_cpu_trains_in_bf16_only_with_amx(monkeypatch, bf16_kernels, amx, expected):
    monkeypatch.setattr(amp, "cpu_supports_bf16", lambda: bf16_kernels)
    monkeypatch.setattr(amp, "cpu_has_amx", lambda: amx)
    assert amp.resolve_amp_dtype("auto", torch.device("cpu")) is expected


def test_explicit_choices_are_taken_as_given():
    cpu = torch.device("cpu")
    assert amp.resolve_amp_dtype("off", cpu) is None
    assert amp.resolve_amp_dtype("bf16", cpu) is torch.bfloat16
    assert amp.resolve_amp_dtype("fp16", cpu) is torch.float16
