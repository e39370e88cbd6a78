"""`tramontane.dp` works on any nn.Module: only `dp/mistral.py` knows `tramontane.models`, and the rules for
other module types come from the registry. A rule (or a routing rule) registered by the user for a custom
module type is the one used, and its per-example gradients match a one-example-at-a-time autograd loop."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.unit.test_dp_layers import DTYPE, RTOL, _sin_losses, assert_matches_oracle, per_example_grads
from tests.unit.test_import_layers import SRC, imports_of, module_name
from tramontane.dp import DPEngine, RoutingRule, Rule, register_rule
from tramontane.dp import rules as dp_rules
from tramontane.dp.contributions import PerExample
from tramontane.errors import ConfigError, UnsupportedModuleError

MODEL_AWARE = "tramontane.dp.mistral"  # the one module of dp/ that may import tramontane.models


def _model_imports() -> dict[str, list[str]]:
    """Module of tramontane.dp -> its imports of tramontane.models (parsed with `ast`, as
    test_import_layers does: lazy, relative and importlib imports included)."""
    found = {}
    for path in sorted((SRC / "dp").rglob("*.py")):
        module = module_name(path)
        imports = imports_of(path.read_text(), module, path.name == "__init__.py")
        found[module] = [imp.statement for imp in imports if any(
            t == "tramontane.models" or t.startswith("tramontane.models.") for t in imp.targets)]
    return found


def test_only_the_mistral_module_imports_the_models() -> None:
    found = _model_imports()
    assert {"tramontane.dp", "tramontane.dp.engine", "tramontane.dp.recording", "tramontane.dp.rules",
            MODEL_AWARE} <= found.keys()
    offenders = {module: statements for module, statements in found.items()
                 if statements and module != MODEL_AWARE}
    assert offenders == {}, f"only {MODEL_AWARE} may import tramontane.models"
    assert found[MODEL_AWARE]  # the check does see its imports


def test_importing_any_dp_module_registers_the_mistral_rules() -> None:
    """A fresh interpreter that imports only the recorder (no `tramontane.dp` by name, no model first) still
    plans a Mixtral with the Mistral rules: the package registers them, without an import cycle."""
    code = ("from tramontane.dp.recording import Recorder\n"
            "from tramontane.models import ModelArgs, MoeArgs, Transformer\n"
            "args = ModelArgs(dim=16, n_layers=1, head_dim=8, hidden_dim=24, n_heads=2, n_kv_heads=1, "
            "norm_eps=1e-5, vocab_size=11, moe=MoeArgs(num_experts=2, num_experts_per_tok=1))\n"
            "rec = Recorder(Transformer(args), 'auto')\n"
            "print(sorted(set(rec.describe().values())),"
            " [type(r).__name__ for r in rec.routings.values()])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[0] == "['EmbeddingRule', 'LinearRule', 'NormRule'] ['MoeRouting']"


# -- a user's rule for a custom module type -----------------------------------------------------------------
class Gain(nn.Module):
    """y = x * gain over the last axis: a custom module type the engine has no rule for."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 2.0, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class GainRule(Rule):
    """d loss / d gain for one example: sum over its rows of x * g. Keeps what it computed, for the test."""

    param_names = ("gain",)

    def __init__(self) -> None:
        self.per_example: list[torch.Tensor] = []

    def capture(self, module, args, kwargs, output, output_leaf):
        return args[0].detach()

    def contributions(self, module, saved, grad_out, layout, want, ctx):
        self.per_example.append(layout.per_example_sum(saved * grad_out))
        return {"gain": PerExample(self.per_example[-1])}


class GainSubclass(Gain):
    """Same forward: inherits Gain's rule."""


class GainTwice(Gain):
    """A new forward: Gain's rule would be wrong for it, so the generic rule takes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test are undone after it."""
    monkeypatch.setattr(dp_rules, "_RULES", dict(dp_rules._RULES))
    monkeypatch.setattr(dp_rules, "_ROUTING", dict(dp_rules._ROUTING))


def _gain_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), Gain(6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)


def test_a_registered_rule_is_used_and_matches_the_one_example_loop(registry) -> None:
    model = _gain_model()
    x = torch.randn(5, 4, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    assert DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0).describe()["1"] == "FunctionalRule"
    rule = GainRule()
    register_rule(Gain, rule)
    engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0)
    assert engine.describe() == {"0": "LinearRule", "1": "GainRule", "3": "LinearRule"}
    with engine.record():
        engine.backward(_sin_losses(model, x))
    (got,) = rule.per_example  # the rule ran, once: its per-example gradients [B, 6] against the loop's
    oracle = torch.stack([grads["1.gain"] for grads in per_example_grads(model, _sin_losses, x)])
    torch.testing.assert_close(got, oracle, rtol=RTOL, atol=RTOL * oracle.abs().max().item())
    assert_matches_oracle(model, _sin_losses, x)  # norms and clipped sums, clipping on and off
    assert len(rule.per_example) == 3


def test_lookup_walks_the_mro_only_while_forward_is_inherited(registry) -> None:
    register_rule(Gain, GainRule())
    patched = Gain(3)
    patched.forward = lambda x: x * patched.gain  # an instance's own forward: the rule cannot know it
    cases = {"same": GainSubclass(3), "twice": GainTwice(3), "patched": patched}
    kinds = {name: type(dp_rules.rule_for(m, {"gain"})).__name__ for name, m in cases.items()}
    assert kinds == {"same": "GainRule", "twice": "FunctionalRule", "patched": "FunctionalRule"}

    class Linear2(nn.Linear):  # a subclass that keeps forward gets the fast generic rule
        pass

    assert type(dp_rules.rule_for(Linear2(2, 2), {"weight", "bias"})).__name__ == "LinearRule"
    torch.manual_seed(0)
    model = nn.Sequential(GainTwice(4), Linear2(4, 2)).to(DTYPE)
    assert_matches_oracle(model, _sin_losses, torch.randn(5, 3, 4, dtype=DTYPE,
                                                          generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ConfigError, match="nn.Module subclass"):
        register_rule(int, GainRule())
    with pytest.raises(ConfigError, match="Rule or a RoutingRule"):
        register_rule(Gain, object())


# -- a user's routing rule for a custom mixture of experts -------------------------------------------------
class TinyMoE(nn.Module):
    """Top-1 routing of the token rows [B*T, d] to experts, gated by the router's softmax."""

    def __init__(self, dim: int = 4, experts: int = 3) -> None:
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.router(tokens)
        gate, choice = torch.softmax(logits, -1).max(-1)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            (rows,) = torch.where(choice == e)
            out = out.index_add(0, rows, expert(tokens[rows]) * gate[rows, None])
        return out.view(x.shape)


class TinyRouting(RoutingRule):
    def router(self, module):
        return module.router

    def branches(self, module):
        return list(module.experts)

    def branch_rows(self, module, router_output):
        choice = router_output.argmax(-1)
        return [torch.where(choice == e)[0] for e in range(len(module.experts))]


def test_a_registered_routing_rule_charges_expert_rows_to_their_examples(registry) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), TinyMoE(), nn.Linear(4, 2)).to(DTYPE)
    x = torch.randn(6, 5, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(UnsupportedModuleError, match="dim 0 must be the example axis"), engine.record():
        engine.backward(_sin_losses(model, x))  # unregistered: expert rows are not examples
    register_rule(TinyMoE, TinyRouting())
    with torch.no_grad():  # the test means something only if an expert mixes rows of several examples
        choice = model[2].router(torch.tanh(model[0](x))).argmax(-1)  # B T
    assert any(len(set(torch.where(choice == e)[0].tolist())) > 1 for e in range(3))
    assert_matches_oracle(model, _sin_losses, x)
