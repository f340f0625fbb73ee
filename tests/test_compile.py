"""``torch.compile(fullgraph=True)`` on every layer type and on the tiny Phi-3 with LoRA.

``fullgraph=True`` turns any graph break into an error, so every compiled call here also
proves there is none; ``torch._dynamo.explain`` and dynamo's graph-break counter confirm it.
Compiled outputs and gradients equal eager ones (fp32, 1e-5) with inductor, the default
backend, on the model holding every layer type. The other tests use ``aot_eager`` (dynamo's
capture and AOTAutograd without inductor's C++ codegen, which costs ~30 s of CI per model on
CPU) wrapped in a backend that counts the graphs it is asked to compile: each state change
(train/eval, adapter off, merge, unmerge) may cost at most one new graph, and a state seen
before costs none.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.backends.debugging import aot_eager
from torch._dynamo.utils import counters

import lora_layers
from tests.helpers import assert_close, fill_lora_, lora_phi3, phi3_ids


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


class GraphCounter:
    """A dynamo backend that counts the graphs it compiles, then runs them with aot_eager."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return aot_eager(gm, example_inputs)


class EveryLayer(nn.Module):
    """Embedding -> Linear -> Linear(fan_in_fan_out) -> MergedLinear -> Conv1d/2d/3d."""

    def __init__(self, lora_dropout: float = 0.0) -> None:
        super().__init__()
        p = lora_dropout
        self.emb = lora_layers.Embedding(20, 16, r=4, lora_alpha=8)
        self.lin = lora_layers.Linear(16, 24, r=4, lora_alpha=8, lora_dropout=p)
        self.t_lin = lora_layers.Linear(24, 24, r=2, lora_alpha=4, fan_in_fan_out=True)
        self.qkv = lora_layers.MergedLinear(
            24, 24, r=2, lora_alpha=4, lora_dropout=p, enable_lora=(True, False, True)
        )
        self.c1 = lora_layers.Conv1d(24, 8, 3, r=2, lora_alpha=4, padding=1, lora_dropout=p)
        self.c2 = lora_layers.Conv2d(1, 4, 3, r=2, lora_alpha=4, padding=1, lora_dropout=p)
        self.c3 = lora_layers.Conv3d(1, 2, 3, r=2, lora_alpha=4, padding=1, lora_dropout=p)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: (B, T)
        h = self.emb(ids)  # (B, T, 16)
        h = self.qkv(self.t_lin(torch.tanh(self.lin(h))))  # (B, T, 24)
        h = self.c1(h.transpose(1, 2))  # (B, 8, T)
        h = self.c2(h.unsqueeze(1))  # (B, 4, 8, T)
        h = self.c3(h.unsqueeze(1))  # (B, 2, 4, 8, T)
        return h.mean(dim=(1, 2))  # (B, 8, T)


def every_layer(lora_dropout: float = 0.0) -> EveryLayer:
    torch.manual_seed(0)
    model = EveryLayer(lora_dropout)
    for _, layer in lora_layers.lora_modules(model):
        fill_lora_(layer, std=0.2)
    return lora_layers.mark_only_lora_as_trainable(model).train()


IDS = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))


def loss_and_grads(fn, model: nn.Module, *args, seed: int = 0, **kwargs):
    """Run one forward/backward; return the output and the trainable parameters' grads."""
    torch.manual_seed(seed)
    out = fn(*args, **kwargs)
    loss = out.loss if hasattr(out, "loss") else out.square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return (out.loss if hasattr(out, "loss") else out).detach(), grads


def assert_grads_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        assert grad.abs().sum() > 0, f"{name} has an all-zero grad"
        assert_close(grad, expected[name])


def set_adapters(model: nn.Module, on: bool) -> None:
    for _, layer in lora_layers.lora_modules(model):
        layer.disable_adapters = not on


def assert_no_graph_breaks() -> None:
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_every_layer_type_inductor_matches_eager_in_train_and_eval():
    model = every_layer()
    compiled = torch.compile(model, fullgraph=True)  # inductor
    out, grads = loss_and_grads(compiled, model, IDS)
    ref_out, ref_grads = loss_and_grads(model, model, IDS)
    assert_close(out, ref_out)
    assert_grads_close(grads, ref_grads)

    model.eval()  # merges every layer
    assert all(layer.merged for _, layer in lora_layers.lora_modules(model))
    with torch.no_grad():
        assert_close(compiled(IDS), model(IDS))
    assert_no_graph_breaks()
    assert counters["stats"]["unique_graphs"] == 2  # one for train, one for merged eval


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_every_layer_type_has_no_graph_breaks(mode):
    model = every_layer(lora_dropout=0.1).train(mode == "train")
    with torch.set_grad_enabled(mode == "train"):
        explained = torch._dynamo.explain(model)(IDS)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_state_changes_cost_at_most_one_recompile_each():
    """train/eval, adapters off/on, unmerge/merge: at most one new graph, outputs still exact."""
    model = every_layer()
    backend = GraphCounter()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    new_graphs = {}

    def step(name, change, grad=False):
        change()
        before = backend.graphs
        with torch.set_grad_enabled(grad):
            if grad:
                out, grads = loss_and_grads(compiled, model, IDS)
                ref_out, ref_grads = loss_and_grads(model, model, IDS)
                assert_grads_close(grads, ref_grads)
                with torch.no_grad():  # a training step, so the next merge sees new values
                    for n, p in model.named_parameters():
                        if p.requires_grad:
                            p.sub_(0.1 * ref_grads[n])
            else:
                out, ref_out = compiled(IDS), model(IDS)
        assert_close(out, ref_out)
        new_graphs[name] = backend.graphs - before

    step("train", lambda: model.train(), grad=True)
    step("eval (merge)", lambda: model.eval())
    step("train again (unmerge)", lambda: model.train(), grad=True)
    step("eval again (merge the updated adapter)", lambda: model.eval())
    step("adapters off", lambda: set_adapters(model, on=False))
    step("adapters on", lambda: set_adapters(model, on=True))
    step("unmerge", lambda: [m.unmerge() for _, m in lora_layers.lora_modules(model)])
    step("merge", lambda: [m.merge() for _, m in lora_layers.lora_modules(model)])

    assert max(new_graphs.values()) <= 1, new_graphs
    # States seen before reuse their graph.
    assert new_graphs["train again (unmerge)"] == 0, new_graphs
    assert new_graphs["eval again (merge the updated adapter)"] == 0, new_graphs
    assert new_graphs["adapters on"] == 0, new_graphs
    assert new_graphs["merge"] == 0, new_graphs
    assert_no_graph_breaks()


def test_dropout_path_compiles_and_matches_eager_with_the_same_seed():
    model = every_layer(lora_dropout=0.2)
    backend = GraphCounter()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out, grads = loss_and_grads(compiled, model, IDS, seed=7)
    ref_out, ref_grads = loss_and_grads(model, model, IDS, seed=7)
    assert_close(out, ref_out)  # same seed, same dropout masks
    assert_grads_close(grads, ref_grads)
    other, _ = loss_and_grads(compiled, model, IDS, seed=8)
    assert not torch.allclose(other, out)  # dropout is really on
    assert backend.graphs == 1
    assert_no_graph_breaks()


def test_tiny_phi3_with_lora_compiles_fullgraph_and_matches_eager():
    model = lora_phi3()
    ids = phi3_ids(batch=2, seq=8)
    backend = GraphCounter()
    compiled = torch.compile(model, fullgraph=True, backend=backend)

    loss, grads = loss_and_grads(compiled, model, input_ids=ids, labels=ids)
    ref_loss, ref_grads = loss_and_grads(model, model, input_ids=ids, labels=ids)
    assert_close(loss, ref_loss)
    assert_grads_close(grads, ref_grads)
    assert len(grads) == 2 * len(list(lora_layers.lora_modules(model)))  # only LoRA trains

    model.eval()
    new_graphs = {}
    for name, change in [
        ("eval", lambda: None),
        ("merge_lora", lambda: lora_layers.merge_lora(model)),
        ("adapters off", lambda: set_adapters(model, on=False)),
        ("adapters on", lambda: set_adapters(model, on=True)),
        ("unmerge_lora", lambda: lora_layers.unmerge_lora(model)),
    ]:
        change()
        before = backend.graphs
        with torch.no_grad():
            assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
        new_graphs[name] = backend.graphs - before
    assert max(new_graphs.values()) <= 1, new_graphs
    assert new_graphs["adapters on"] == 0 and new_graphs["unmerge_lora"] == 0, new_graphs
    assert_no_graph_breaks()
