"""SliceLayout: the one walk over output slices, and layers built from a layout argument."""

from __future__ import annotations

import pytest
import torch

import lora_layers
from lora_layers.config import SliceLayout
from tests.helpers import assert_close, fill_lora_


def test_blocks_of_unequal_slices_with_a_disabled_middle():
    layout = SliceLayout.of((6, 2, 4), (True, False, True))
    assert layout.out_slices == ((0, 6), (8, 12)) and layout.out_features == 12
    assert not layout.is_whole and layout.b_rows == 10
    assert layout.blocks(3) == (
        (slice(0, 6), slice(0, 3), slice(0, 6)),
        (slice(8, 12), slice(3, 6), slice(6, 10)),
    )
    assert layout.blocks(3) is layout.blocks(3)  # computed once per rank
    assert layout.lora_shapes(3, 5) == ((6, 5), (10, 3))


def test_whole_layout_is_one_slice_over_every_output():
    layout = SliceLayout.whole(7)
    assert layout.is_whole and layout.out_slices == ((0, 7),)
    assert layout == SliceLayout.of((7,), (True,))
    assert SliceLayout.of((3, 4), (True, True)).is_whole is False  # two slices, not one


def test_delta_weight_places_each_slice_and_leaves_disabled_rows_zero():
    layout = SliceLayout.of((6, 2, 4), (True, False, True))
    A, B = torch.randn(6, 5), torch.randn(10, 3)
    delta = layout.delta_weight(A, B, 0.5, torch.float64)
    expected = torch.zeros(12, 5, dtype=torch.float64)
    expected[0:6] = 0.5 * (B[0:6].double() @ A[0:3].double())
    expected[8:12] = 0.5 * (B[6:10].double() @ A[3:6].double())
    assert delta.dtype == torch.float64 and torch.equal(delta, expected)


def test_linear_refuses_a_layout_for_another_output_size():
    with pytest.raises(ValueError, match="is for 12 outputs, not 8"):
        lora_layers.Linear(4, 8, r=2, slice_layout=SliceLayout.whole(12))


def test_linear_built_from_a_slice_layout_is_the_merged_linear():
    """The layout is an argument, read by Linear.__init__: no subclass state needed first."""
    torch.manual_seed(0)
    merged = lora_layers.MergedLinear(
        5, 12, r=3, lora_alpha=6, enable_lora=(True, False, True), split_sizes=(6, 2, 4)
    )
    fill_lora_(merged)
    layout = SliceLayout.of((6, 2, 4), (True, False, True))
    plain = lora_layers.Linear(5, 12, r=3, lora_alpha=6, slice_layout=layout)
    plain.load_state_dict(merged.state_dict())
    x = torch.randn(4, 5)
    W, A, B = merged.weight, merged.lora_A, merged.lora_B
    delta = torch.zeros(12, 5)
    delta[0:6] = 2.0 * (B[0:6] @ A[0:3])
    delta[8:12] = 2.0 * (B[6:10] @ A[3:6])
    expected = x @ (W + delta).T + merged.bias
    assert_close(plain(x), expected)
    assert_close(merged(x), expected)
    assert torch.equal(plain.delta_weight(), merged.delta_weight())
