"""kernels.class_ce: the torch reference against a float64 definition, and the Triton kernels (interpreted on
CPU, compiled on CUDA) against the reference, on the output and the gradient. Re-run a failure with
``SAMTUNE_TEST_SEED=<seed>`` (printed by every test and part of every failure message)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import (
    BF16,
    FACTORS,
    FP32,
    GPU_DTYPES,
    assert_close,
    assert_grad_close,
    check_sm90,
    unsaturated_grad_scale,
    valid_rows,
)

import kernels
from kernels._dispatch import INTERPRETED
from kernels.reference import class_ce_reference

ce_module = sys.modules["kernels.class_ce_triton"]
IGNORE = -100


def make_inputs(b, c, h, w, *, seed, factor=4, valid="mixed", dtype=torch.float32, device="cpu"):
    """``(B, C, h, w)`` logits, ``(B, factor h, factor w)`` labels (a fifth ignored), valid sizes and upstream
    gradients; reproducible from ``seed``."""
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn on the device, as in the mask_losses tests
    kw = {"generator": gen, "device": device}
    logits = torch.randn(b, c, h, w, **kw) * 3
    height, width = factor * h, factor * w
    labels = torch.randint(0, c, (b, height, width), **kw)
    labels[torch.rand(b, height, width, **kw) < 0.2] = IGNORE

    def mixed():
        rvh = int(torch.randint(1, height + 1, (), **kw))
        rvw = int(torch.randint(1, width + 1, (), **kw))
        return [(rvh, rvw), (0, width), (height + 3, width + 1), (height, 1)], 0

    rows = valid_rows(valid, b, height, width, mixed)
    weights = torch.rand(b, **kw) + 0.5
    return logits.to(dtype), labels, torch.tensor(rows, device=device), weights


def run(logits, labels, valid_hw, weights, *, backend, **kw):
    x = logits.detach().clone().requires_grad_()
    out = kernels.class_ce(x, labels, valid_hw, IGNORE, backend, **kw)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return out.detach(), grad


def compare(got, want, atol, rtol, context, grad_scale=None):
    assert_close(got[0], want[0], atol=atol, rtol=rtol, what=f"ce {context}")
    assert_grad_close(got[1], want[1], atol=atol, rtol=rtol, what=f"grad {context}", scale=grad_scale)


def against_float32_reference(logits, labels, valid_hw, weights, factor, tol, context, **kw):
    """The Triton op against the float32 torch reference. The reference forms ``softmax - 1`` for a confident
    pixel's labelled class from a probability near 1, which float32 resolves only to an absolute 2^-24, so
    the gradient floor is taken against an unsaturated pixel's gradient size; the kernel avoids that
    cancellation, and test_triton_confident_logits_are_precise holds it to the default floor."""
    compare(
        run(logits, labels, valid_hw, weights, backend="triton", **kw),
        run(logits, labels, valid_hw, weights, backend="torch"),
        *tol,
        context,
        grad_scale=unsaturated_grad_scale(weights, valid_hw, factor),
    )


def definition_float64(logits, labels, valid_hw):
    """Literally: upsample 4x to ``(4h, 4w)`` labels (not at all to ``(h, w)`` ones), crop each image,
    F.cross_entropy with ignore_index (0 where nothing counts)."""
    b, c, h, w = logits.shape
    frame = tuple(labels.shape[1:])
    up = logits.double()
    if frame == (4 * h, 4 * w):
        up = F.interpolate(up, frame, mode="bilinear", align_corners=False)
    assert up.shape[2:] == frame, (logits.shape, labels.shape)
    rows = []
    for i in range(b):
        vh, vw = (min(max(int(v), 0), s) for v, s in zip(valid_hw[i], frame))
        lab = labels[i, :vh, :vw]
        if int((lab != IGNORE).sum()) == 0:
            rows.append(up[i].sum() * 0)
            continue
        rows.append(F.cross_entropy(up[i, :, :vh, :vw][None], lab[None], ignore_index=IGNORE))
    return torch.stack(rows)


def shape_id(s):
    return "B{}_C{}_h{}_w{}".format(*s)


@FACTORS
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 3, 5), (4, 4, 2, 3)], ids=shape_id)
def test_reference_matches_float64_definition(shape, factor, seed):
    logits, labels, valid_hw, weights = make_inputs(*shape, seed=seed, factor=factor, dtype=torch.float64)
    got = run(logits, labels, valid_hw, weights, backend="torch")
    x = logits.clone().requires_grad_()
    want = definition_float64(x, labels, valid_hw)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), x)
    compare(got, (want.detach(), want_grad), 1e-12, 1e-10, f"shape={shape} factor={factor} seed={seed}")


@FACTORS
def test_reference_gradcheck(factor, seed):
    logits, labels, valid_hw, _ = make_inputs(2, 3, 2, 3, seed=seed, factor=factor, dtype=torch.float64)
    valid_hw = torch.tensor([[2, 3], [2, 2]]) * factor - torch.tensor([[0, 0], [factor // 2, 1]])
    labels[:, 0, 0] = 1  # at least one counted pixel per image

    def ce(x):
        return class_ce_reference(x, labels, valid_hw, IGNORE)

    assert torch.autograd.gradcheck(ce, (logits.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)


# At factor 1 the default tiles are 32 pixels wide, so the side of 64 puts a tile seam inside the images.
SHAPES = [(1, 1, 1, 1), (2, 3, 3, 17), (3, 2, 17, 3), (1, 5, 17, 17), (2, 2, 1, 64)]


@FACTORS
@pytest.mark.parametrize("tol", [FP32])
@pytest.mark.parametrize("valid", ["full", "row", "col", "mixed"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.interpreter
def test_triton_matches_reference(shape, valid, factor, tol, seed):
    logits, labels, valid_hw, weights = make_inputs(*shape, seed=seed, factor=factor, valid=valid)
    context = f"shape={shape} factor={factor} valid={valid_hw.tolist()} seed={seed}"
    against_float32_reference(logits, labels, valid_hw, weights, factor, tol, context)


@pytest.mark.parametrize("tol", [FP32])
@pytest.mark.parametrize("shape,factor", [((2, 3, 9, 7), 4), ((2, 3, 36, 28), 1)], ids=["x4", "x1"])
@pytest.mark.interpreter
def test_triton_tile_seams(shape, factor, tol, seed):
    """block=4: tiles of 16x16 target pixels, so several seams cross each image at either factor."""
    logits, labels, valid_hw, weights = make_inputs(*shape, seed=seed, factor=factor)
    context = f"block=4 factor={factor} valid={valid_hw.tolist()} seed={seed}"
    against_float32_reference(logits, labels, valid_hw, weights, factor, tol, context, block=4)


@FACTORS
@pytest.mark.parametrize("tol", [BF16])
@pytest.mark.interpreter
def test_triton_bfloat16(factor, tol, seed):
    logits, labels, valid_hw, weights = make_inputs(
        2, 3, 5, 9, seed=seed, factor=factor, dtype=torch.bfloat16
    )
    got = run(logits, labels, valid_hw, weights, backend="triton")
    assert got[1].dtype == torch.bfloat16
    want = run(logits, labels, valid_hw, weights, backend="torch")
    compare(got, want, *tol, f"bf16 factor={factor} seed={seed}")


@FACTORS
@pytest.mark.interpreter
def test_triton_confident_logits_are_precise(factor):
    """Every pixel labelled right with a class margin from 4 to 30, so every gradient is tiny: the kernel's
    gradient keeps its relative precision against float64 where ``exp(x - lse) - 1`` would lose it to the
    rounding of lse (the default gradient floor, no rescaling)."""
    margin = torch.linspace(4, 30, 3 * 5).reshape(1, 1, 3, 5)
    logits = torch.cat([margin, torch.zeros_like(margin), -margin / 2], dim=1)  # (1, 3, 3, 5)
    labels = torch.zeros(1, 3 * factor, 5 * factor, dtype=torch.long)
    valid_hw = torch.tensor([[3 * factor, 5 * factor]])
    weights = torch.ones(1)
    got = run(logits, labels, valid_hw, weights, backend="triton")
    want = run(logits.double(), labels, valid_hw, weights.double(), backend="torch")
    compare(got, want, 1e-6, 1e-4, f"confident logits vs float64, factor={factor}")


@FACTORS
@pytest.mark.interpreter
def test_nothing_counted_is_zero(factor):
    logits, labels, _, weights = make_inputs(2, 3, 2, 2, seed=0, factor=factor)
    labels[0] = IGNORE  # image 0: every label ignored; image 1: empty valid region
    valid_hw = torch.tensor([[2 * factor, 2 * factor], [0, 2 * factor]])
    for backend in ("torch", "triton"):
        out, grad = run(logits, labels, valid_hw, weights, backend=backend)
        assert torch.equal(out, torch.zeros(2)), (backend, out)
        assert torch.equal(grad, torch.zeros_like(grad)), backend


@FACTORS
@pytest.mark.interpreter
def test_out_of_range_label(factor):
    """The reference raises; the kernel, which cannot raise without a sync, ignores the pixel."""
    logits, labels, valid_hw, weights = make_inputs(1, 3, 2, 2, seed=0, factor=factor, valid="full")
    bad = labels.clone()
    bad[0, 0, 0] = 3
    with pytest.raises(ValueError, match="outside"):
        kernels.class_ce(logits, bad, valid_hw, IGNORE, "torch")
    ignored = labels.clone()
    ignored[0, 0, 0] = IGNORE
    compare(
        run(logits, bad, valid_hw, weights, backend="triton"),
        run(logits, ignored, valid_hw, weights, backend="torch"),
        1e-6,
        1e-4,
        f"out-of-range label, factor={factor}",
    )


@FACTORS
def test_auto_on_cpu_is_the_reference(factor, seed):
    logits, labels, valid_hw, weights = make_inputs(2, 3, 3, 4, seed=seed, factor=factor)
    got = run(logits, labels, valid_hw, weights, backend="auto")
    want = run(logits, labels, valid_hw, weights, backend="torch")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.skipif(INTERPRETED, reason="the kernels were built for the interpreter, which runs CPU tensors")
def test_triton_on_cpu_needs_the_interpreter():
    logits, labels, valid_hw, _ = make_inputs(1, 2, 2, 2, seed=0)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.class_ce(logits, labels, valid_hw, IGNORE, "triton")


# Each bad input: how it is made from good (logits, labels, valid_hw), and what the error says (if checked).
BAD_INPUTS = {
    "labels_shape": (
        lambda x, y, v: (x, y[:, :-1], v),
        r"labels must end in \(12, 16\) .* or \(3, 4\) .*got \(2, 11, 16\)",
    ),
    "labels_factor_2": (lambda x, y, v: (x, y[:, ::2, ::2], v), r"got \(2, 6, 8\)"),  # no 2x upsample
    "labels_float": (lambda x, y, v: (x, y.float(), v), "labels must be integer"),
    "valid_shape": (lambda x, y, v: (x, y, v[:, :1]), "valid_hw"),
    "valid_float": (lambda x, y, v: (x, y, v.float()), "valid_hw"),
    "logits_rank": (lambda x, y, v: (x[0], y, v), "logits"),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", list(BAD_INPUTS))
def test_input_validation(bad, backend):
    """Bad inputs raise a ValueError before any kernel runs, on either backend."""
    logits, labels, valid_hw, _ = make_inputs(2, 3, 3, 4, seed=0)
    spoil, match = BAD_INPUTS[bad]
    with pytest.raises(ValueError, match=match):
        kernels.class_ce(*spoil(logits, labels, valid_hw), IGNORE, backend)


@FACTORS
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("which", ["fwd", "bwd"])
def test_kernels_compile_for_sm90(which, dtype, factor):
    """Both kernels lower to sm_90 code at their launch configs, without atomics or register spills."""
    kernel, (block, warps) = {
        "fwd": (ce_module._class_ce_fwd, ce_module.FWD_CONFIG[factor]),
        "bwd": (ce_module._class_ce_bwd, ce_module.BWD_CONFIG[factor]),
    }[which]
    check_sm90(kernel, dtype, {"UP": factor, "BLOCK": block}, warps)


@FACTORS
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", GPU_DTYPES)
def test_gpu_full_size(dtype, tol, factor, seed):
    logits, labels, valid_hw, weights = make_inputs(
        8, 5, 256, 256, seed=seed, factor=factor, dtype=dtype, device="cuda"
    )
    got = run(logits, labels, valid_hw, weights, backend="auto")
    want = run(logits.float(), labels, valid_hw, weights, backend="torch")
    context = f"{dtype} factor={factor} seed={seed}"
    compare((got[0], got[1].float()), (want[0], want[1].to(dtype).float()), *tol, context)
