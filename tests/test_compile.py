"""torch.compile: the model traces to one graph (train and eval, forward and backward), compiled
training steps give the eager losses and gradients, and ``main.py --compile`` trains end to end.

Inductor compiles C++ kernels on the CPU (about a minute per model here), so the compiling tests
are marked slow and use a 4-block MOAT.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models.moat import MOAT, MoatCfg


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: cached graphs of another model (same code objects, other
    sizes) would make dynamo recompile with dynamic shapes."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small_moat(**kwargs) -> MOAT:
    """One block per stage (MBConv, MBConv, MOAT, MOAT), attention with relative bias."""
    torch.manual_seed(0)
    cfg = MoatCfg(
        stem_dims=(8, 8), depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), stage_types=("mbconv", "mbconv", "moat", "moat")
    )
    return MOAT(cfg, num_classes=5, **kwargs)


def _batch(size: int = 64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, size, size, generator=g).to(memory_format=torch.channels_last)
    return x, torch.randint(0, 5, (4,), generator=g)


@pytest.mark.parametrize("train", [True, False])
def test_forward_and_backward_trace_to_one_graph_without_breaks(train):
    model = small_moat().train(train).to(memory_format=torch.channels_last)
    x, _ = _batch()

    def step(inputs):
        out = model(inputs)
        if train:
            out.sum().backward()
        return out

    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_training_steps_give_the_eager_losses_and_gradients():
    eager = small_moat(window_size=(None, None)).to(memory_format=torch.channels_last)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, dynamic=False)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_c = torch.optim.SGD(compiled_model.parameters(), lr=0.05)
    x, y = _batch()
    for step in range(3):
        losses, grads = [], []
        for model, fwd, opt in ((eager, eager, opt_e), (compiled_model, compiled, opt_c)):
            opt.zero_grad()
            loss = F.cross_entropy(fwd(x), y)
            loss.backward()
            losses.append(loss.detach())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            opt.step()
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
        # Gradients as one vector: single entries that are zero in exact arithmetic (a bias in
        # front of a train-mode BatchNorm) differ by rounding noise only.
        assert (grads[1] - grads[0]).norm() <= 1e-4 * grads[0].norm(), f"step {step}"


@pytest.mark.slow
def test_main_compile_trains_end_to_end_and_validates(image_tree, tiny_cfg, tmp_path):
    """A 4-block architecture from YAML keeps the compile (C++ kernels on a CPU) to about a minute."""
    import main as trainer
    from conftest import read_log, read_summary

    arch = {"STEM_DIMS": [8, 8], "DEPTHS": [1, 1, 1, 1], "DIMS": [16, 16, 32, 32],
            "STAGE_TYPES": ["mbconv", "mbconv", "moat", "moat"]}  # fmt: skip
    cfg = tiny_cfg(MODEL={"NAME": "compile_probe", "MOAT": arch}, TRAIN={"EPOCHS": 1, "COMPILE": True})
    assert trainer.main(["--cfg", cfg, "--data-path", image_tree, "--output", str(tmp_path)]) == 0
    run_dir = tmp_path / "compile_probe" / "default"
    (row,) = read_summary(run_dir)
    assert 0 < float(row["train_loss"]) < 10 and row["val_top1"] != ""
    assert "torch.compile, mode default" in read_log(run_dir)
