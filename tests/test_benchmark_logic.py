"""Fast checks of what the benchmark scripts compute besides timings: the roofline's FLOP and
byte counts, the throughput table's row selection (model options, compile modes, baselines), how
the GPU suite reads trainer logs, floors and lever tables, and that the pad-free depthwise
variant computes the model's function."""

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


def test_model_options_and_compile_modes_make_their_own_rows_and_baselines():
    compiled = "tiny_moat_0,tiny_moat_0:train:max-autotune,tiny_moat_0+linear_1x1"
    specs = _specs("--models", "tiny_moat_0,tiny_moat_0+linear_1x1", "--modes", "train", "--compile", "off,on",
                   "--compile-mode", "default,max-autotune", "--eager-models", "tiny_moat_0",
                   "--compiled-models", compiled)  # fmt: skip
    labels = sorted(s.label for s in specs)
    assert labels == [
        "tiny_moat_0 train fp32",
        "tiny_moat_0 train fp32 compiled",
        "tiny_moat_0 train fp32 compiled max-autotune",
        "tiny_moat_0+linear_1x1 train fp32 compiled",
    ]
    assert model_throughput.split_model("moat_0+fused_depthwise+linear_1x1") == (
        "moat_0",
        {"fused_depthwise": True, "linear_1x1": True},
    )
    rows = {s: s for s in specs}
    autotuned = next(s for s in specs if s.compile_mode == "max-autotune")
    # Omitted fields come from the row; a compile mode the baseline model lacks falls back to default.
    assert model_throughput.find_baseline(rows, "tiny_moat_0", autotuned) is autotuned
    plain = model_throughput.find_baseline(rows, "tiny_moat_0:compiled:default", autotuned)
    assert plain.compile and plain.compile_mode == "default" and plain.model == "tiny_moat_0"
    option = next(s for s in specs if s.model == "tiny_moat_0+linear_1x1")
    assert model_throughput.find_baseline(rows, "tiny_moat_0:eager", option).compile is False


def _row(model, compile_, img_s, mode="default", peak=1000.0, first=60.0):
    label = f"{model} train bf16 CL" + (" compiled" if compile_ else "") + (f" {mode}" if mode != "default" else "")
    return dict(model=model, mode="train", compile=compile_, compile_mode=mode, img_s=img_s, peak_mib=peak,
                first_step_s=first, label=label, ms_step=128 / img_s * 1e3)  # fmt: skip


def test_lever_decisions_compare_within_one_run():
    rows = [
        _row("coatnet_0_rw_224", False, 1800.0),
        _row("coatnet_0_rw_224", True, 2400.0),
        _row("moat_0", True, 1600.0),
        _row("moat_0+fused_depthwise", True, 1700.0, peak=900.0),
        _row("moat_0+flex_attention", True, 1610.0),
        _row("moat_0", True, 1650.0, mode="max-autotune-no-cudagraphs", first=300.0),
        _row("moat_0+linear_1x1", True, 1600.0, mode="max-autotune-no-cudagraphs"),
    ]
    lines = gpu_suite.lever_decisions(rows, "moat_0", "coatnet_0_rw_224")
    assert lines[0].startswith("- moat_0 compiled / coatnet_0_rw_224 eager: 0.89x")
    assert lines[1].startswith("- moat_0 compiled / coatnet_0_rw_224 compiled: 0.67x")
    by_row = {line.split(":")[0][2:]: line for line in lines[2:]}
    assert (
        "1.062x moat_0 train bf16 CL compiled, peak memory 0.90x"
        in by_row["moat_0+fused_depthwise train bf16 CL compiled"]
    )
    assert by_row["moat_0+fused_depthwise train bf16 CL compiled"].endswith("ON (gains)")
    assert by_row["moat_0+flex_attention train bf16 CL compiled"].endswith("off (no gain beyond noise)")
    # An option under another compile mode is compared with the plain row of that mode.
    linear = by_row["moat_0+linear_1x1 train bf16 CL compiled max-autotune-no-cudagraphs"]
    assert "0.970x moat_0 train bf16 CL compiled max-autotune-no-cudagraphs" in linear
    assert "first step 300 s vs 60 s" in by_row["moat_0 train bf16 CL compiled max-autotune-no-cudagraphs"]


def test_floor_table_divides_each_row_by_its_models_floor():
    floors = {("moat_0", "train"): 20.0}
    rows = [_row("moat_0", True, 1600.0), _row("coatnet_0_rw_224", True, 2400.0)]
    lines = gpu_suite.floor_table(rows, floors)
    assert lines[2] == "| moat_0 train bf16 CL compiled | 80.0 | 20.00 | 4.0 |" and len(lines) == 3
    # The floor of a training step is three forward floors, options do not change it.
    one = gpu_suite.floor_ms("tiny_moat_0+fused_depthwise", "infer", 8, 64, 2, 3.0)
    assert gpu_suite.floor_ms("tiny_moat_0", "train", 8, 64, 2, 3.0) == 3 * one > 0


def test_fused_kernel_check_compares_each_shape_with_the_modules():
    head = "| shape | variant | ms fwd+bwd | x modules | x floor | rel. error out | dx | dw | d gamma | d beta |"
    ok_rows = [
        "| 8x9s1 | modules | 1.0 | 1.00 | 3.0 | 2.0e-03 | 3.0e-03 | 4.0e-03 | 3.0e-03 | 2.0e-03 |",
        "| 8x9s1 | fused | 0.5 | 2.00 | 1.5 | 3.0e-03 | 6.0e-03 | 8.0e-03 | 4.0e-03 | 2.0e-03 |",
    ]
    assert gpu_suite.fused_kernel_check("\n".join([head, *ok_rows]))[0]
    bad = ok_rows[1].replace("6.0e-03", "2.0e-02")
    assert not gpu_suite.fused_kernel_check("\n".join([head, ok_rows[0], bad]))[0]
    failed = "| 8x9s1 | fused | failed: no CUDA | | | | | | | |"
    assert not gpu_suite.fused_kernel_check("\n".join([head, ok_rows[0], failed]))[0]
