"""Export a trained MOAT to safetensors, TorchScript, ONNX and/or a timm hub folder.

    python tools/export.py output/tiny_moat_0/default/best.pth --format safetensors onnx torchscript --check
    python tools/export.py best.pth --format onnx --no-ema --img-size 384 -o exports/moat_0_384
    python tools/export.py best.pth --format timm-folder -o exports/tiny_moat_0_hf

Outputs ``<output>.safetensors``, ``<output>.torchscript.pt``, ``<output>.onnx`` and the folder
``<output>-timm`` (``<output>`` itself when it is the only format); the default ``<output>`` is
the checkpoint's path without extension plus ``-ema`` or ``-raw`` (which weights went in).
Weights: EMA when the checkpoint has them, unless ``--no-ema``.

* timm-folder: ``config.json`` + ``model.safetensors`` as ``timm.models.save_for_hf`` writes
  them (``models/hub.py``), with the class names and preprocessing in the ``pretrained_cfg``:
  ``timm.create_model('local-dir:FOLDER', pretrained=True)`` loads it, and so does
  ``hf-hub:USER/REPO`` once pushed (``hf upload USER/REPO FOLDER .``).

* safetensors: weights only, plus metadata (variant, class names JSON, preprocessing JSON:
  img_size, crop_pct, interpolation, mean, std, crop; model args) that ``checkpoints.py``,
  ``tools/predict.py`` and ``hubconf.py`` read back.
* TorchScript: ``torch.jit.trace`` of the eval model; the same metadata rides along as the
  extra file ``moat_meta.json``. Like the ONNX graph below, the trace accepts any batch and,
  with global attention, any multiple of 32 as H and W.
* ONNX: input ``input`` ``[B, 3, H, W]`` -> output ``logits`` ``[B, num_classes]``, the metadata
  as ``metadata_props``. Batch is always dynamic. Image size: with the default global attention
  the legacy (TorchScript-based) exporter gives a graph whose H and W are dynamic too, valid for
  any multiple of 32 (the relative-bias resize and gather are traced as shape-driven ops; the
  Python shape branches it freezes - zero 'SAME' padding, global-attention reshape - take the
  same path at every multiple of 32). Windowed attention (MODEL.MOAT.WINDOW_SIZE) or
  ``--static-size`` gives a fixed ``--img-size``. ``--dynamo`` uses the torch.export-based
  exporter instead (needs ``onnxscript``; batch only: with dynamic H/W it did not finish in
  5 minutes on tiny_moat_0, and it is ~6x slower than the legacy exporter for a fixed size).

``--check`` reloads the safetensors file and compares the tensors, and compares TorchScript and
ONNX (onnxruntime) outputs with PyTorch on random inputs at two batch sizes, plus a non-square
size when the size is dynamic; it fails with exit code 1 above ``--atol`` / ``--rtol``.
torch >= 2.9 calls TorchScript and the legacy ONNX exporter deprecated; those notices are
silenced here because they are, today, the exporters that keep the image size dynamic.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import sys
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, _REPO)

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import ModelMeta, add_weights_choice, load_for_inference, safetensors_metadata, save_safetensors
from utils.errors import RunStoppedError, UserError, run_tool
from utils.progress import progress_bar

FORMATS = ("safetensors", "torchscript", "onnx", "timm-folder")
EXTENSIONS = {"safetensors": ".safetensors", "torchscript": ".torchscript.pt", "onnx": ".onnx", "timm-folder": "-timm"}
DEFAULT_OPSET = 18
ONNX_INPUT, ONNX_OUTPUT = "input", "logits"


class CheckFailed(RunStoppedError):
    """An exported model disagrees with PyTorch beyond the tolerance (exit code 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"check failed: {message}")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "MOAT export",
        add_help=add_help,
        description="Export a trained MOAT to safetensors / TorchScript / ONNX.",
        epilog="ONNX image size: dynamic (any multiple of 32) with global attention and the "
        "default legacy exporter; fixed --img-size with windowed attention, --static-size "
        "or --dynamo. Batch is always dynamic.",
    )
    parser.add_argument("checkpoint", help="trainer checkpoint (.pth) or exported .safetensors")
    parser.add_argument(
        "--format",
        nargs="+",
        choices=FORMATS,
        default=["safetensors"],
        help="one or more output formats (default: safetensors)",
    )
    parser.add_argument(
        "-o",
        "--output",
        default=None,
        help="output path without extension (default: the checkpoint's, plus -ema / -raw)",
    )
    parser.add_argument(
        "--variant", default=None, help="expected variant; required only for files that do not name theirs"
    )
    add_weights_choice(parser, verb="export")
    parser.add_argument(
        "--img-size", type=int, default=None, help="trace / fixed ONNX input size (default: the training DATA.IMG_SIZE)"
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument(
        "--static-size", action="store_true", help="ONNX: fixed --img-size even where a dynamic size is possible"
    )
    parser.add_argument(
        "--dynamo", action="store_true", help="ONNX: torch.export-based exporter (needs onnxscript; dynamic batch only)"
    )
    parser.add_argument(
        "--check", action="store_true", help="compare the exported models with PyTorch (onnxruntime for ONNX)"
    )
    parser.add_argument("--atol", type=float, default=1e-4, help="--check absolute tolerance")
    parser.add_argument("--rtol", type=float, default=1e-3, help="--check relative tolerance")
    return parser


def output_paths(base: str, formats: Sequence[str]) -> Dict[str, str]:
    """``{format: base + extension}`` (a base that already ends in its one format's extension
    stays, and so does the base of a timm folder written alone)."""
    if len(formats) == 1 and (base.endswith(EXTENSIONS[formats[0]]) or formats[0] == "timm-folder"):
        return {formats[0]: base}
    return {fmt: base + EXTENSIONS[fmt] for fmt in formats}


def meta_json(meta: ModelMeta) -> str:
    """The safetensors metadata as one JSON object (TorchScript extra file, ONNX props source)."""
    return json.dumps(safetensors_metadata(meta), sort_keys=True)


def supports_dynamic_size(model: nn.Module) -> bool:
    """True for global attention in both MOAT stages (the traced graph then fits every size)."""
    return all(w is None for w in getattr(model, "window_size", (None, None)))


def _example(batch: int, img_size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, img_size, img_size, generator=generator)


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence the tracer's warnings about frozen Python shape branches (the module docstring says
    why they hold at every multiple of 32; ``--check`` verifies it) and the legacy-exporter notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # torch >= 2.9 flags both TorchScript and the legacy ONNX exporter as deprecated; they are
        # still what exports this model with a dynamic image size (see the module docstring).
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        warnings.filterwarnings("ignore", message=r"You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message=r"The feature will be removed", category=DeprecationWarning)
        yield


def export_torchscript(model: nn.Module, meta: ModelMeta, path: str, img_size: int) -> str:
    """``torch.jit.trace`` of the eval model, with ``moat_meta.json`` as an extra file."""
    with _quiet_tracing(), torch.no_grad():
        traced = torch.jit.trace(model, _example(2, img_size), check_trace=False)
        torch.jit.save(traced, path, _extra_files={"moat_meta.json": meta_json(meta)})
    return path


@functools.lru_cache(maxsize=None)
def _legacy_onnx_exports_sdpa_scale(opset: int) -> bool:
    """Compat (torch < 2.5): can the legacy ONNX exporter translate
    ``F.scaled_dot_product_attention(..., scale=<float>)``? torch 2.4's opset-14 symbolic hands the
    float to ``g.op`` and fails with a TypeError (pytorch/pytorch#135594, fixed in 2.5). Probed by
    exporting a one-op module (tens of ms), not by version number."""

    class _Probe(nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, q, q, scale=0.5)

    try:
        with _quiet_tracing(), torch.no_grad():
            torch.onnx.export(_Probe(), (torch.zeros(1, 1, 2, 4),), io.BytesIO(), dynamo=False, opset_version=opset)
    except Exception:  # noqa: BLE001 - any failure here means: do not export through SDPA
        return False
    return True


@contextlib.contextmanager
def _explicit_attention(model: nn.Module, enable: bool) -> Iterator[None]:
    """With ``enable``, run every ``fused_attn`` module on its explicit (reference) attention path
    for the duration; the ONNX graph then has the same MatMul/Softmax ops, without SDPA."""
    saved = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")] if enable else []
    for m, _ in saved:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, fused in saved:
            m.fused_attn = fused


def export_onnx(
    model: nn.Module,
    meta: ModelMeta,
    path: str,
    img_size: int,
    opset: int = DEFAULT_OPSET,
    dynamic_size: bool = True,
    dynamo: bool = False,
) -> str:
    """ONNX with a dynamic batch (and dynamic H, W when ``dynamic_size``); metadata as props."""
    import onnx

    if dynamo and dynamic_size:
        raise UserError("--dynamo exports a fixed image size only; add --static-size")
    example = (_example(2, img_size),)
    names = dict(opset_version=opset, input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT])
    with _quiet_tracing(), torch.no_grad():
        if dynamo:
            try:
                import onnxscript  # noqa: F401 (only checks that the dynamo exporter can run)
            except ImportError:
                raise UserError("--dynamo needs the onnxscript package (pip install onnxscript)") from None
            program = torch.onnx.export(
                model,
                example,
                dynamo=True,
                verbose=False,
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}},
                **names,
            )
            program.save(path)
        else:
            axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
            with _explicit_attention(model, not _legacy_onnx_exports_sdpa_scale(opset)):
                torch.onnx.export(
                    model,
                    example,
                    path,
                    dynamo=False,
                    dynamic_axes={ONNX_INPUT: axes, ONNX_OUTPUT: {0: "batch"}},
                    **names,
                )
    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, safetensors_metadata(meta))
    onnx.save(proto, path)
    return path


def _compare(name: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> float:
    diff = float(np.abs(got - want).max())
    if got.shape != want.shape or not np.allclose(got, want, atol=atol, rtol=rtol):
        raise CheckFailed(
            f"{name}: output differs from PyTorch (shape {got.shape} vs {want.shape}, "
            f"max abs diff {diff:.3g}, atol {atol}, rtol {rtol})"
        )
    return diff


def check_cases(img_size: int, dynamic_size: bool) -> List[Tuple[int, int, int]]:
    """(batch, H, W) inputs to compare: two batch sizes, plus a non-square size when dynamic."""
    cases = [(1, img_size, img_size), (3, img_size, img_size)]
    if dynamic_size:
        cases.append((2, img_size + 32, img_size))
    return cases


def check_export(
    model: nn.Module, fmt: str, path: str, cases: Sequence[Tuple[int, int, int]], atol: float = 1e-4, rtol: float = 1e-3
) -> float:
    """Max abs difference between ``path`` (a TorchScript or ONNX file) and ``model`` over
    ``cases``; raises ``CheckFailed`` above tolerance."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

        def run(x: torch.Tensor):
            return session.run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy()})[0]
    elif fmt == "torchscript":
        with _quiet_tracing():
            scripted = torch.jit.load(path, map_location="cpu")

        def run(x: torch.Tensor):
            return scripted(x).numpy()
    else:
        raise ValueError(f"no output check for format {fmt!r}")
    model = model.to("cpu").eval()
    worst = 0.0
    for i, (batch, h, w) in enumerate(cases):
        x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(100 + i))
        with torch.no_grad():
            want = model(x).numpy()
            got = run(x)
        worst = max(worst, _compare(f"{fmt} {path} at input {batch}x3x{h}x{w}", got, want, atol, rtol))
    return worst


def export(args: argparse.Namespace) -> Dict[str, str]:
    """Write the requested formats; returns ``{format: path}``."""
    model, meta = load_for_inference(args.checkpoint, variant=args.variant, use_ema=args.use_ema)
    img_size = args.img_size or meta.preprocessing["img_size"]
    if img_size <= 0 or img_size % 32:
        raise UserError(f"--img-size must be a positive multiple of 32 (MOAT's output stride), got {img_size}")
    base = args.output or os.path.splitext(args.checkpoint)[0] + f"-{meta.weights}"
    paths = output_paths(base, list(dict.fromkeys(args.format)))
    if any(os.path.abspath(p) == os.path.abspath(args.checkpoint) for p in paths.values()):
        raise UserError(f"the output would overwrite the input {args.checkpoint}; pick another --output")
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    dynamic_size = supports_dynamic_size(model) and not args.static_size and not args.dynamo
    if not supports_dynamic_size(model) and "onnx" in paths and not args.static_size:
        print(f"export.py: note: windowed attention: ONNX image size fixed at {img_size}", file=sys.stderr)

    bar = progress_bar(total=len(paths), desc="export", unit="format")
    for fmt, path in paths.items():
        bar.set_description(f"export {fmt}")
        if fmt == "safetensors":
            save_safetensors(model, meta, path)
        elif fmt == "timm-folder":
            from models.hub import save_timm_folder

            save_timm_folder(model, path, meta.class_names, meta.preprocessing)
        elif fmt == "torchscript":
            export_torchscript(model, meta, path, img_size)
        else:
            export_onnx(model, meta, path, img_size, args.opset, dynamic_size, args.dynamo)
        # Printed through the bar, so on a terminal the lines stay above it.
        wrote = f"wrote {fmt}: {path} ({meta.variant}, {meta.weights} weights, {meta.num_classes} classes)"
        bar.write(wrote, file=sys.stdout)
        if args.check and fmt in ("safetensors", "timm-folder"):
            if fmt == "safetensors":
                new = load_for_inference(path)[0].state_dict()
            else:
                from safetensors.torch import load_file

                new = load_file(os.path.join(path, "model.safetensors"))
            ref = model.state_dict()
            if set(new) != set(ref) or any(not torch.equal(ref[k], new[k]) for k in ref):
                raise CheckFailed(f"{path}: reloaded weights differ from the exported model")
            bar.write("  check: reloaded weights equal", file=sys.stdout)
        elif args.check:
            cases = check_cases(img_size, dynamic_size)
            diff = check_export(model, fmt, path, cases, args.atol, args.rtol)
            bar.write(
                f"  check: max abs diff {diff:.2e} vs PyTorch over inputs "
                + ", ".join(f"{b}x3x{h}x{w}" for b, h, w in cases),
                file=sys.stdout,
            )
        bar.update()
    bar.close()
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: the exit code (0, 1 when --check fails, 2 for a user error)."""
    return run_tool("export.py", lambda: export(get_args_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
