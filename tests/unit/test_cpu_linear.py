"""oneDNN-packed linear layers (`models.cpu_linear`) against the plain model: logits to float rounding, the
same greedy tokens, in float32 and bfloat16, dense and MoE; state_dict round trips; training refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.conftest import random_model, tiny_args
from tramontane.errors import UnsupportedModuleError
from tramontane.generation import SamplingParams, generate
from tramontane.models.cpu_linear import PackedLinear, pack_linear, prepack_for_inference

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

PROMPTS = [[1, 5, 7, 9, 3, 11, 2], [4, 4, 8]]
# bfloat16 keeps 8 significant bits: two kernels that sum in another order differ by a few of its ulps
BF16_TOL = 3e-2


def _packed(model: nn.Module) -> nn.Module:
    packed = prepack_for_inference(copy.deepcopy(model), always=True)
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == n_linear > 0
    assert not any(type(m) is nn.Linear for m in packed.modules())
    return packed


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_model_gives_the_plain_models_logits_and_tokens(moe: bool, dtype: torch.dtype) -> None:
    model = random_model(tiny_args(moe=moe), seed=7).to(dtype)
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # oneDNN packs no bfloat16 weight on this CPU (AVX2 only): every layer must stay as it was
        unpacked = prepack_for_inference(copy.deepcopy(model), always=True)
        assert not any(isinstance(m, PackedLinear) for m in unpacked.modules())
        assert unpacked.state_dict().keys() == model.state_dict().keys()
        pytest.skip("oneDNN packs no bfloat16 weight on this CPU")
    packed = _packed(model)
    tokens = torch.tensor([PROMPTS[0] * 3])
    with torch.no_grad():
        expected, got = model(tokens).float(), packed(tokens).float()
    assert expected.abs().max() > 1  # not a degenerate model whose logits all round alike
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    else:
        torch.testing.assert_close(got, expected, rtol=BF16_TOL, atol=BF16_TOL * expected.abs().max().item())
    params = SamplingParams(max_tokens=16)
    expected_tokens = [r.tokens for r in generate(model, PROMPTS, params)]
    assert [r.tokens for r in generate(packed, PROMPTS, params)] == expected_tokens


def test_packed_layer_equals_f_linear_with_bias_and_any_leading_shape() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 40)
    packed = pack_linear(linear, always=True)
    assert isinstance(packed, PackedLinear)
    for shape in [(1, 48), (5, 48), (2, 3, 48)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-6)


def test_timed_choice_is_either_layer_with_the_same_results() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(64, 96, bias=False)
    chosen = pack_linear(linear, rows=(1, 4))
    assert chosen is linear or isinstance(chosen, PackedLinear)
    assert pack_linear(nn.Linear(64, 96, bias=False), rows=(1, 4)).__class__ is chosen.__class__  # cached
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(chosen(x), linear(x), rtol=1e-5, atol=1e-6)


def test_only_plain_cpu_float_linears_are_packed() -> None:
    half = nn.Linear(8, 8).half()
    assert pack_linear(half, always=True) is half
    model = random_model(tiny_args(tied_embeddings=True), seed=2)
    packed = prepack_for_inference(copy.deepcopy(model), always=True)
    assert type(packed.output) is nn.Linear  # tied to the embeddings: packing would keep two copies
    assert packed.output.weight is packed.tok_embeddings.weight


def test_packed_model_refuses_training() -> None:
    packed = _packed(random_model(tiny_args(), seed=3))
    tokens = torch.tensor([PROMPTS[0]])
    assert not packed.training and not any(p.requires_grad for p in packed.parameters())
    packed(tokens)  # inference works without no_grad: the model is frozen
    packed.train()
    with pytest.raises(UnsupportedModuleError, match="without prepacking"):
        packed(tokens)
    packed.eval()
    x = torch.randn(2, packed.args.dim, requires_grad=True)
    with pytest.raises(UnsupportedModuleError):
        packed.output(x)
    with torch.no_grad():
        packed.output(x)


def test_state_dict_is_the_plain_models_and_loads_back() -> None:
    model = random_model(tiny_args(moe=True), seed=4)
    packed = _packed(model)
    state = packed.state_dict()
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    other = _packed(random_model(tiny_args(moe=True), seed=5))
    other.load_state_dict(state)
    tokens = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert torch.equal(other(tokens), packed(tokens))
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict({**state, "output.weight": state["output.weight"][:, :-1]})
