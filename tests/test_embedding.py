"""lora_layers.Embedding against the dense reference ``W + scaling * (B @ A).T``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_layers
from tests.helpers import DTYPES, assert_close, fill_lora_, up

NUM, DIM, R, ALPHA = 20, 8, 4, 8
INDEX_SHAPES = [(5,), (2, 5), (2, 3, 5)]


def make(dtype=torch.float32, **kw):
    kw.setdefault("r", R)
    kw.setdefault("lora_alpha", ALPHA)
    layer = lora_layers.Embedding(NUM, DIM, dtype=dtype, **kw)
    if layer.r:
        fill_lora_(layer)  # A is zeros at init: both factors must be made non-zero
    return layer


def dense_table(W, A, B, scaling) -> torch.Tensor:
    """(num_embeddings, embedding_dim): W + scaling * (B @ A).T."""
    return W + scaling * (B @ A).t()


@pytest.mark.parametrize("shape", INDEX_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_and_grads_match_dense_reference(dtype, shape):
    layer = make(dtype)
    idx = torch.randint(0, NUM, shape)
    g = torch.randn(*shape, DIM).to(dtype)
    y = layer(idx)
    y.backward(g)

    A, B = (up(t.detach()).requires_grad_() for t in (layer.lora_A, layer.lora_B))
    y_ref = dense_table(up(layer.weight), A, B, layer.scaling)[idx]
    y_ref.backward(up(g))

    assert y.shape == (*shape, DIM) and y.dtype == dtype
    assert_close(y, y_ref)
    assert_close(layer.lora_A.grad, A.grad)
    assert_close(layer.lora_B.grad, B.grad)
    assert layer.weight.grad is None  # frozen
    # Indices carry no gradient; rows never looked up get no update.
    unused = torch.ones(NUM, dtype=torch.bool)
    unused[idx.unique()] = False
    assert torch.count_nonzero(layer.lora_A.grad[:, unused]) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merged_equals_unmerged_and_weight_bit_exact(dtype):
    layer = make(dtype)
    idx = torch.randint(0, NUM, (3, 7))
    with torch.no_grad():
        unmerged = layer(idx)
        merged = layer.eval()(idx)
    W, A, B = layer.weight, layer.lora_A, layer.lora_B
    expected_weight = (up(W) + layer.scaling * (up(B) @ up(A)).t()).to(W.dtype)
    assert layer.merged and torch.equal(layer.merged_weight, expected_weight)
    assert torch.equal(merged, expected_weight[idx])
    assert_close(unmerged, dense_table(up(W), up(A), up(B), layer.scaling)[idx])
    assert_close(merged, up(unmerged))


def test_init_a_zeros_b_normal_output_equals_base():
    torch.manual_seed(11)
    layer = lora_layers.Embedding(NUM, DIM, r=R)
    torch.manual_seed(11)
    base = nn.Embedding(NUM, DIM)
    expected_B = torch.empty(DIM, R)
    nn.init.normal_(expected_B)
    assert torch.equal(layer.weight, base.weight)
    assert torch.equal(layer.lora_A, torch.zeros(R, NUM))
    assert torch.equal(layer.lora_B, expected_B)
    idx = torch.randint(0, NUM, (4, 6))
    assert torch.equal(layer(idx), base(idx))


def test_b_init_is_standard_normal():
    layer = lora_layers.Embedding(10, 4000, r=8)
    B = layer.lora_B
    assert abs(B.mean().item()) < 0.02 and abs(B.std().item() - 1.0) < 0.02


def test_padding_idx_row_gets_no_gradient():
    layer = make(padding_idx=0)
    assert layer.padding_idx == 0
    idx = torch.tensor([[0, 3, 0, 5]])
    layer(idx).sum().backward()
    assert torch.count_nonzero(layer.lora_A.grad[:, 0]) == 0
    assert torch.count_nonzero(layer.lora_A.grad[:, 3]) > 0
    # The padding row's output still follows the merged-table formula, merged or not.
    with torch.no_grad():
        expected = dense_table(layer.weight, layer.lora_A, layer.lora_B, layer.scaling)[idx]
        assert_close(layer(idx), expected)
        assert_close(layer.eval()(idx), expected)


def test_max_norm_never_renormalises_lora_a():
    """loralib passes max_norm to the LoRA lookup, renormalising lora_A in place; we do not."""
    layer = make(max_norm=1.0)
    with torch.no_grad():
        layer.lora_A.mul_(10)  # columns far above max_norm
    A_before = layer.lora_A.detach().clone()
    idx = torch.arange(NUM)
    W_before = layer.weight.detach().clone()
    y = layer(idx)
    assert torch.equal(layer.lora_A, A_before)
    renormed = F.embedding(idx, W_before.clone(), max_norm=1.0)  # base rows renormalised only
    expected = renormed + layer.scaling * (layer.lora_B @ A_before).t()
    assert_close(y, expected)
    # Merged eval runs unmerged with max_norm (a merged table would be renormalised as a whole).
    with torch.no_grad():
        assert_close(layer.eval()(idx), expected)
    assert torch.equal(layer.lora_A, A_before)


def test_r0_is_plain_embedding_and_fan_in_fan_out_raises():
    torch.manual_seed(4)
    layer = lora_layers.Embedding(NUM, DIM, r=0)
    torch.manual_seed(4)
    base = nn.Embedding(NUM, DIM)
    assert [n for n, _ in layer.named_parameters()] == ["weight"]
    idx = torch.randint(0, NUM, (3,))
    assert torch.equal(layer(idx), base(idx))
    assert layer.bias is None
    with pytest.raises(ValueError, match="fan_in_fan_out=True makes no sense for Embedding"):
        lora_layers.Embedding(NUM, DIM, r=2, fan_in_fan_out=True)


def test_from_module_shares_weight_and_keeps_options():
    base = nn.Embedding(NUM, DIM, padding_idx=2, max_norm=3.0, scale_grad_by_freq=True)
    layer = lora_layers.Embedding.from_module(base, r=R, lora_alpha=ALPHA)
    assert layer.weight is base.weight and layer.bias is None
    assert (layer.padding_idx, layer.max_norm, layer.scale_grad_by_freq) == (2, 3.0, True)
    assert layer.lora_A.shape == (R, NUM) and layer.lora_B.shape == (DIM, R)
    with torch.device("meta"):
        meta = nn.Embedding(NUM, DIM)
    layer = lora_layers.Embedding.from_module(meta, r=R)
    assert layer.weight is meta.weight and layer.lora_B.is_meta


def test_sparse_base_gradient():
    layer = lora_layers.Embedding(NUM, DIM, r=0, sparse=True)
    layer(torch.tensor([1, 2])).sum().backward()
    assert layer.weight.grad.is_sparse


# ---------------------------------------------------------------- max_norm (issue 12, item 3)
def test_merge_and_unload_refuses_max_norm_and_changes_nothing():
    """A plain nn.Embedding(max_norm) renormalises merged rows: no merged table is equal."""
    model = nn.Sequential(make(max_norm=1.0))
    layer = model[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"cannot merge the LoRA update of Embedding\(max_norm=1.0\)"
    ):
        lora_layers.merge_and_unload(model)
    assert model[0] is layer
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="max_norm=1.0"):
        layer.get_merged_weight()
    layer.merge()  # never merges: the unmerged path is the only exact one
    assert not layer.merged and not layer.eval().merged
    lora_layers.unload(model)  # the other way out still works
    assert type(model[0]) is nn.Embedding


def test_merge_and_unload_without_max_norm_gives_equal_outputs():
    model = nn.Sequential(make(padding_idx=3))
    idx = torch.randint(0, NUM, (4, 5))
    with torch.no_grad():
        expected = model(idx)
        lora_layers.merge_and_unload(model)
        assert type(model[0]) is nn.Embedding
        assert_close(model(idx), expected)


# ---------------------------------------------------------------- scale_grad_by_freq (item 4)
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_scale_grad_by_freq_divides_lora_a_gradient_by_token_count(padding_idx):
    """As loralib and PEFT: lora_A's column of token i gets its gradient / count(i); lora_B's
    gradient is unchanged (it is not looked up)."""
    plain = make(padding_idx=padding_idx)
    scaled = make(padding_idx=padding_idx, scale_grad_by_freq=True)
    scaled.load_state_dict(plain.state_dict())
    idx = torch.tensor([[1, 1, 1, 2], [0, 3, 3, 1]])
    g = torch.randn(2, 4, DIM)
    plain(idx).backward(g)
    scaled(idx).backward(g)
    counts = torch.bincount(idx.flatten(), minlength=NUM).clamp(min=1)
    assert counts[1] == 4
    torch.testing.assert_close(scaled.lora_A.grad, plain.lora_A.grad / counts)
    torch.testing.assert_close(scaled.lora_B.grad, plain.lora_B.grad)
    assert not torch.allclose(scaled.lora_A.grad, plain.lora_A.grad)


def test_scale_grad_by_freq_matches_peft():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(NUM, DIM, scale_grad_by_freq=True))
    ours = lora_layers.Embedding.from_module(
        nn.Embedding(NUM, DIM, scale_grad_by_freq=True), r=R, lora_alpha=ALPHA
    )
    fill_lora_(ours)
    with torch.no_grad():
        ours.weight.copy_(base[0].weight)
    peft_model = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"]))
    theirs = peft_model.base_model.model[0]
    with torch.no_grad():
        theirs.lora_embedding_A["default"].copy_(ours.lora_A)
        theirs.lora_embedding_B["default"].copy_(ours.lora_B)
    idx = torch.tensor([[1, 1, 1, 2], [5, 3, 3, 1]])
    g = torch.randn(2, 4, DIM)
    ours(idx).backward(g)
    theirs(idx).backward(g)
    torch.testing.assert_close(ours.lora_A.grad, theirs.lora_embedding_A["default"].grad)
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_embedding_B["default"].grad)
