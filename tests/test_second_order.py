"""Second derivatives and torch.func transforms of every layer, against a dense reference.

For every layer type (Linear, Linear with fan_in_fan_out, MergedLinear with a disabled slice
and unequal sizes, Embedding, Conv1d/2d/3d) in train mode without and with dropout (seeded,
so the mask is reproducible) and merged in eval mode, in float64:

* ``gradcheck`` and ``gradgradcheck`` of the layer as a function of (input, lora_A, lora_B);
* a Hessian-vector product of a non-linear loss against the same product through the dense
  reference ``W + scaling * B @ A`` written here (B non-zero);
* ``torch.func``: per-sample gradients with ``vmap(grad)``, ``jvp`` and ``jacrev`` against
  the dense reference differentiated by plain autograd.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call, grad, jacrev, jvp, vmap

import lora_layers
import lora_layers.functional as lf
from tests.helpers import fill_lora_

F64 = torch.float64
P = 0.3  # dropout probability of the "dropout" mode
SEED = 1234  # reseeded before every call, so every call draws the same mask
KINDS = ["linear", "linear_fan_in_fan_out", "merged", "embedding", "conv1d", "conv2d", "conv3d"]
MODES = ["train", "dropout", "merged"]


def make(kind: str, mode: str):
    """A float64 layer of ``kind`` with random non-zero A and B, in ``mode``, and an input."""
    p = P if mode == "dropout" else 0.0
    kw = {"r": 2, "lora_alpha": 3.0, "dtype": F64}
    if kind != "embedding":
        kw["lora_dropout"] = p
    if kind == "linear":
        layer, x = lora_layers.Linear(6, 5, **kw), torch.randn(2, 3, 6, dtype=F64)
    elif kind == "linear_fan_in_fan_out":
        layer = lora_layers.Linear(6, 5, fan_in_fan_out=True, **kw)
        x = torch.randn(2, 3, 6, dtype=F64)
    elif kind == "merged":
        layer = lora_layers.MergedLinear(
            6, 7, enable_lora=(True, False, True), split_sizes=(3, 2, 2), **kw
        )
        x = torch.randn(2, 3, 6, dtype=F64)
    elif kind == "embedding":
        layer, x = lora_layers.Embedding(9, 4, **kw), torch.randint(0, 9, (2, 3))
    elif kind == "conv1d":
        layer, x = lora_layers.Conv1d(3, 4, 3, padding=1, **kw), torch.randn(2, 3, 5, dtype=F64)
    elif kind == "conv2d":
        layer = lora_layers.Conv2d(2, 3, 2, stride=2, **kw)
        x = torch.randn(2, 2, 4, 4, dtype=F64)
    elif kind == "conv3d":
        layer = lora_layers.Conv3d(2, 2, 2, **kw)
        x = torch.randn(2, 2, 3, 3, 3, dtype=F64)
    else:
        raise AssertionError(kind)
    fill_lora_(layer)
    if kind == "embedding":
        with torch.no_grad():
            layer.lora_A.normal_()  # the embedding's A starts at zero; make both non-zero
    layer.train(mode != "merged")
    assert layer.merged == (mode == "merged")
    return layer, x


def floating_input(x: torch.Tensor) -> bool:
    return x.is_floating_point()


def params(layer):
    return layer.lora_A.detach().clone(), layer.lora_B.detach().clone()


def run(layer, x, A, B):
    """The layer's output with ``A``/``B`` in place of its LoRA parameters (seeded)."""
    torch.manual_seed(SEED)
    return functional_call(layer, {"lora_A": A, "lora_B": B}, (x,))


def drop_scale(layer, x: torch.Tensor, fast: bool) -> torch.Tensor | None:
    """The dropout factor ``keep / P(keep)`` a seeded forward applies, or None (no dropout).

    The fast path (Linear / MergedLinear outside torch.func transforms) draws its mask with
    ``lora_layers.functional.keep_mask`` (keep probability ``dropout_keep_probability(p)``);
    the plain path with ``nn.Dropout`` (``1 - p``).
    """
    p = layer.dropout_p if layer.training else 0.0
    if p == 0.0:
        return None
    torch.manual_seed(SEED)
    if fast:
        keep = lf.keep_mask((x[..., 0].numel(), x.shape[-1]), p, x.device).view(x.shape)
        return keep.to(x.dtype) / lf.dropout_keep_probability(p)
    return F.dropout(torch.ones_like(x), p)


def dense(layer, x, A, B, scale: torch.Tensor | None):
    """The layer's output from its dense weight ``W + scaling * B @ A``, written out here."""
    s = layer.scaling
    xd = x if scale is None else x * scale
    if isinstance(layer, lora_layers.Embedding):
        return F.embedding(x, layer.weight + s * (B @ A).t())
    if isinstance(layer, lora_layers.Linear):
        w = layer.weight.t() if layer.fan_in_fan_out else layer.weight  # (out, in)
        sizes = getattr(layer, "split_sizes", (layer.out_features,))
        enable = getattr(layer, "enable_lora", (True,))
        blocks, i, b_row = [], 0, 0
        for size, on in zip(sizes, enable, strict=True):
            if on:
                blocks.append(s * B[b_row : b_row + size] @ A[i * layer.r : (i + 1) * layer.r])
                i, b_row = i + 1, b_row + size
            else:
                blocks.append(torch.zeros(size, layer.in_features, dtype=x.dtype))
        return F.linear(x, w, layer.bias) + F.linear(xd, torch.cat(blocks))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(layer.kernel_size)]
    geometry = (layer.stride, layer.padding, layer.dilation, layer.groups)
    delta = s * (B @ A).view(layer.weight.shape)
    return conv(x, layer.weight, layer.bias, *geometry) + conv(xd, delta, None, *geometry)


def fast_path(layer) -> bool:
    return type(layer) in (lora_layers.Linear, lora_layers.MergedLinear)


def cases(kinds=KINDS):
    return [
        pytest.param(k, m, id=f"{k}-{m}")
        for k in kinds
        for m in MODES
        if not (k == "embedding" and m == "dropout")
    ]


@pytest.mark.parametrize(("kind", "mode"), cases())
def test_gradcheck_and_gradgradcheck(kind, mode):
    layer, x = make(kind, mode)
    A, B = (t.requires_grad_() for t in params(layer))
    if floating_input(x):
        x.requires_grad_()
        inputs = (x, A, B)
        fn = lambda x, A, B: run(layer, x, A, B)  # noqa: E731
    else:
        inputs = (A, B)
        fn = lambda A, B: run(layer, x, A, B)  # noqa: E731
    assert gradcheck(fn, inputs, fast_mode=True)
    assert gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize(("kind", "mode"), cases([k for k in KINDS if k != "embedding"]))
def test_gradgradcheck_input_only(kind, mode):
    """Frozen A and B: a merged layer runs its merged weight; second derivatives still hold."""
    layer, x = make(kind, mode)
    x.requires_grad_()
    layer.requires_grad_(False)

    def fn(x):
        torch.manual_seed(SEED)
        return layer(x)

    assert gradcheck(fn, (x,), fast_mode=True)
    assert gradgradcheck(fn, (x,), fast_mode=True)


def _hvp(f, inputs, v):
    loss = (f(*inputs) ** 2).sum() + f(*inputs).sin().sum()
    gs = torch.autograd.grad(loss, inputs, create_graph=True)
    dot = sum((g * t).sum() for g, t in zip(gs, v, strict=True))
    return torch.autograd.grad(dot, inputs)


@pytest.mark.parametrize(("kind", "mode"), cases())
def test_hessian_vector_product_matches_dense_reference(kind, mode):
    layer, x = make(kind, mode)
    A, B = (t.requires_grad_() for t in params(layer))
    scale = drop_scale(layer, x, fast=fast_path(layer))
    if floating_input(x):
        x.requires_grad_()
        inputs = (x, A, B)
        got_f = lambda x, A, B: run(layer, x, A, B)  # noqa: E731
        ref_f = lambda x, A, B: dense(layer, x, A, B, scale)  # noqa: E731
    else:
        inputs = (A, B)
        got_f = lambda A, B: run(layer, x, A, B)  # noqa: E731
        ref_f = lambda A, B: dense(layer, x, A, B, scale)  # noqa: E731
    torch.testing.assert_close(got_f(*inputs), ref_f(*inputs))
    v = [torch.randn_like(t) for t in inputs]
    got = _hvp(got_f, inputs, v)
    want = _hvp(ref_f, inputs, v)
    assert all(w.abs().max() > 0 for w in want[-2:])  # the product reaches A and B
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def _per_sample_loss(out: torch.Tensor) -> torch.Tensor:
    return (out**2).sum() + out.sum()


@pytest.mark.parametrize(("kind", "mode"), cases())
def test_vmap_grad_per_sample_gradients_match_dense_reference(kind, mode):
    """``vmap(grad)`` per-sample gradients of (A, B) against a loop of plain autograd.

    With dropout, ``randomness="same"`` draws one per-sample mask shared by every sample.
    """
    layer, x = make(kind, mode)
    A, B = params(layer)

    def loss(A, B, xi):
        return _per_sample_loss(run(layer, xi, A, B))

    randomness = "same" if mode == "dropout" else "error"
    gA, gB = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0), randomness=randomness)(
        A, B, x
    )
    scale = drop_scale(layer, x[0], fast=False)  # under torch.func: the plain path's mask
    for i in range(x.shape[0]):
        Ai, Bi = A.clone().requires_grad_(), B.clone().requires_grad_()
        want = torch.autograd.grad(_per_sample_loss(dense(layer, x[i], Ai, Bi, scale)), (Ai, Bi))
        torch.testing.assert_close(gA[i], want[0])
        torch.testing.assert_close(gB[i], want[1])


@pytest.mark.parametrize(("kind", "mode"), cases())
def test_jvp_matches_dense_reference(kind, mode):
    layer, x = make(kind, mode)
    A, B = params(layer)
    tA, tB = torch.randn_like(A), torch.randn_like(B)
    scale = drop_scale(layer, x, fast=False)
    if floating_input(x):
        tx = torch.randn_like(x)
        out, tangent = jvp(lambda x, A, B: run(layer, x, A, B), (x, A, B), (tx, tA, tB))
        _, want = jvp(lambda x, A, B: dense(layer, x, A, B, scale), (x, A, B), (tx, tA, tB))
    else:
        out, tangent = jvp(lambda A, B: run(layer, x, A, B), (A, B), (tA, tB))
        _, want = jvp(lambda A, B: dense(layer, x, A, B, scale), (A, B), (tA, tB))
    torch.testing.assert_close(out, dense(layer, x, A, B, scale))
    # forward-mode AD of the reference, checked by a central difference
    eps = 1e-6
    fd = (
        dense(layer, x, A + eps * tA, B + eps * tB, scale)
        - dense(layer, x, A - eps * tA, B - eps * tB, scale)
    ) / (2 * eps)
    if not floating_input(x):
        torch.testing.assert_close(want, fd)
    torch.testing.assert_close(tangent, want)


@pytest.mark.parametrize(("kind", "mode"), cases())
def test_jacrev_matches_dense_reference(kind, mode):
    layer, x = make(kind, mode)
    A, B = params(layer)
    scale = drop_scale(layer, x, fast=False)
    got = jacrev(lambda A, B: run(layer, x, A, B), argnums=(0, 1))(A, B)
    want = torch.autograd.functional.jacobian(lambda A, B: dense(layer, x, A, B, scale), (A, B))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert math.prod(got[1].shape) > 0 and got[1].abs().max() > 0
