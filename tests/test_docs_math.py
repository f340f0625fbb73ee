"""docs/math.md's numbers, recomputed: the test fails if the document is wrong."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch

import lora_layers

DOC = Path(__file__).resolve().parents[1] / "docs" / "math.md"


def example(name: str) -> dict[str, object]:
    """The ``name = literal`` lines of the fenced block after ``<!-- worked-example: name -->``."""
    text = DOC.read_text()
    match = re.search(rf"<!-- worked-example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"docs/math.md has no worked example {name!r}"
    values = {}
    for node in ast.parse(match.group(1)).body:
        assert isinstance(node, ast.Assign), ast.unparse(node)
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_linear_worked_example():
    ex = example("linear")
    layer = lora_layers.Linear(3, 2, r=2, lora_alpha=4, dtype=torch.float64)
    with torch.no_grad():
        for name, key in [("weight", "W"), ("bias", "b"), ("lora_A", "A"), ("lora_B", "B")]:
            getattr(layer, name).copy_(t(ex[key]))
    x = t(ex["x"])
    assert layer.scaling == ex["scaling"]
    assert torch.equal(layer.lora_B @ layer.lora_A, t(ex["B_at_A"]))
    assert torch.equal(layer.delta_weight(), t(ex["delta_W"]).float())
    assert torch.equal(x @ layer.lora_A.T, t(ex["x_at_A_T"]))
    with torch.no_grad():
        assert torch.equal(layer(x), t(ex["y"]))
        assert torch.equal(layer.scaling * (x @ layer.lora_A.T @ layer.lora_B.T), t(ex["lora_y"]))
        with lora_layers.disable_adapters(layer):
            assert torch.equal(layer(x), t(ex["base_y"]))
        layer.eval()
        assert torch.equal(layer.merged_weight, t(ex["merged_W"]))
        assert torch.equal(layer(x), t(ex["y"]))
    rs = lora_layers.Linear(3, 2, r=2, lora_alpha=4, use_rslora=True)
    assert rs.scaling == pytest.approx(ex["rslora_scaling"], rel=1e-15)
    lora_layers.mark_only_lora_as_trainable(rs)
    assert sum(p.numel() for p in rs.parameters() if p.requires_grad) == ex["trainable"]

    # fan_in_fan_out stores W.T and merges to merged_W.T.
    fifo = lora_layers.Linear(3, 2, r=2, lora_alpha=4, fan_in_fan_out=True, dtype=torch.float64)
    with torch.no_grad():
        fifo.weight.copy_(t(ex["W"]).T)
        fifo.bias.copy_(t(ex["b"]))
        fifo.lora_A.copy_(t(ex["A"]))
        fifo.lora_B.copy_(t(ex["B"]))
        fifo.eval()
        assert torch.equal(fifo.merged_weight, t(ex["merged_W"]).T)
        assert torch.equal(fifo(x), t(ex["y"]))


def test_embedding_worked_example():
    ex = example("embedding")
    layer = lora_layers.Embedding(3, 2, r=1, lora_alpha=1, dtype=torch.float64)
    with torch.no_grad():
        for name, key in [("weight", "W"), ("lora_A", "A"), ("lora_B", "B")]:
            getattr(layer, name).copy_(t(ex[key]))
    ids = torch.tensor(ex["ids"])
    assert layer.scaling == ex["scaling"]
    assert torch.equal(layer.delta_weight(), t(ex["delta_W"]).float())
    with torch.no_grad():
        assert torch.equal(layer(ids), t(ex["y"]))
        layer.eval()
        assert torch.equal(layer.merged_weight, t(ex["merged_W"]))
        assert torch.equal(layer(ids), t(ex["y"]))
    assert layer.lora_A.numel() + layer.lora_B.numel() == ex["trainable"]


def param_count_rows() -> list[tuple[str, int]]:
    text = DOC.read_text()
    table = re.search(r"<!-- param-count-table -->(.*?)<!-- /param-count-table -->", text, re.S)
    assert table, "docs/math.md has no parameter-count table"
    rows = re.findall(r"^\| `([^`]+)` \| ([\d,]+) \|$", table.group(1), re.M)
    assert len(rows) >= 5
    return [(expr, int(count.replace(",", ""))) for expr, count in rows]


@pytest.mark.parametrize("expr, count", param_count_rows())
def test_parameter_count_table(expr, count):
    namespace = {name: getattr(lora_layers, name) for name in lora_layers.__all__}
    with torch.device("meta"):
        layer = eval(expr, {"__builtins__": {}}, namespace)  # only lora_layers constructors
    lora_layers.mark_only_lora_as_trainable(layer)
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == count


def test_scaling_table():
    text = DOC.read_text()
    assert "`lora_alpha / r`" in text and "`lora_alpha / sqrt(r)`" in text
    assert lora_layers.Linear(2, 2, r=16, lora_alpha=32).scaling == 32 / 16
    assert lora_layers.Linear(2, 2, r=16, lora_alpha=32, use_rslora=True).scaling == 32 / math.sqrt(
        16
    )
