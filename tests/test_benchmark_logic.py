"""Fast checks of what the benchmark scripts compute besides timings: the roofline's FLOP and
byte counts, the throughput table's row selection, how the GPU suite reads trainer logs, and that
the pad-free depthwise variant computes the model's function."""

from __future__ import annotations

import torch
import torch.nn as nn

from benchmarks import depthwise_variants, gpu_suite, model_throughput, roofline


def test_roofline_counts_a_convolution_by_hand():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    with roofline.Tally(width=2) as tally:
        conv(x)
    out_elems = 2 * 8 * 8 * 8
    assert tally.flops == 2 * out_elems * 3 * 3 * 3
    assert tally.bytes == 2 * (x.numel() + conv.weight.numel() + out_elems)
    assert set(tally.by_kind) == {"conv"}


def test_roofline_flops_agree_with_torch_flop_counter_for_moat():
    """The roofline counts at the functional level; torch's FlopCounterMode (the throughput
    table's GMACs column) counts aten ops with attention through the math path. Same total."""
    model = model_throughput.timm.create_model("tiny_moat_0").eval()
    x = torch.randn(1, 3, 64, 64)
    counted = roofline.tally("tiny_moat_0", batch=1, img_size=64, width=2)
    assert abs(counted.flops / 2 / 1e9 - model_throughput.count_gmacs(model, x)) < 1e-3 * counted.flops / 2e9
    assert {"conv", "depthwise conv", "linear", "attention"} <= set(counted.by_kind)


def _specs(*argv: str):
    return model_throughput.row_specs(model_throughput.get_args_parser().parse_args(list(argv)))


def test_compiled_rows_only_for_the_named_models_and_modes():
    specs = _specs("--models", "tiny_moat_0,coatnet_nano_rw_224", "--compile", "off,on",
                   "--compiled-models", "tiny_moat_0:train,coatnet_nano_rw_224")  # fmt: skip
    compiled = {(s.model, s.mode) for s in specs if s.compile}
    assert compiled == {("tiny_moat_0", "train"), ("coatnet_nano_rw_224", "train"), ("coatnet_nano_rw_224", "infer")}
    assert sum(not s.compile for s in specs) == 4


def test_reparameterised_rows_only_for_models_that_fold():
    specs = _specs("--models", "tiny_moat_0,coatnet_nano_rw_224", "--reparam", "off,on")
    assert {(s.model, s.mode) for s in specs if s.reparam} == {("tiny_moat_0", "infer")}


def test_trainer_rate_skips_the_first_quarter_of_the_epoch(tmp_path):
    """Logged running averages (``time val (avg)``) -> img/s between a quarter in and the end."""
    log = tmp_path / "train.log"
    lines = []
    for idx, avg in ((0, 5.0), (10, 0.6), (20, 0.35), (30, 0.2667), (39, 0.225)):
        lines.append(f"Train: [0/1][{idx}/40]\teta 0:00:01 lr 0.1\ttime 0.1000 ({avg:.4f})\tloss 1.0")
    log.write_text("\n".join(lines) + "\n")
    # From the logged step 10 (a quarter of 40) to 39: steps 11..39 took 0.225 * 40 - 0.6 * 11 s.
    rate = gpu_suite.trainer_img_per_s(str(log), batch=8, world=1)
    assert abs(rate - 8 * 29 / (0.225 * 40 - 0.6 * 11)) < 1e-6


def test_roofline_table_puts_the_baseline_at_one(capsys):
    roofline.main(["--models", "tiny_moat_0,coatnet_nano_rw_224", "--baseline", "coatnet_nano_rw_224"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| coatnet_nano_rw_224 | 4")]
    assert rows and rows[0].endswith("| 1.00 |")


def test_zero_bordered_4x4_kernel_is_tf_same_stride_2_with_its_gradients():
    torch.manual_seed(0)
    for size in (6, 14):
        x = torch.randn(2, 5, size, size, dtype=torch.float64, requires_grad=True)
        w = torch.randn(5, 1, 3, 3, dtype=torch.float64, requires_grad=True)
        grads = []
        for fn in (depthwise_variants.pad_then_conv, depthwise_variants.conv4x4):
            x.grad = w.grad = None
            out = fn(x, w)
            out.backward(torch.ones_like(out))
            grads.append((out.detach(), x.grad.clone(), w.grad.clone()))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
