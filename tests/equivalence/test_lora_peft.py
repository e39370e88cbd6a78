"""LoRA adapters in PEFT's on-disk layout, against PEFT itself on tiny random Mistral / Mixtral checkpoints:
adapters PEFT's `save_pretrained` writes load into our Transformer with PEFT's logits, adapters we write load
with `PeftModel.from_pretrained` with ours, and merged checkpoints (both formats) reload with the adapted
logits. Then the refusals: adapters that do not fit the base, or use options we do not implement.

Every lora_B is drawn non-zero (PEFT initialises it to zero, which would make every adapter a no-op and every
test pass), wide enough that a missing q/k row permutation or a wrong scaling moves logits by far more than
the 1e-5 tolerance (`test_adapters_move_the_logits` guards that).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from tests.conftest import random_model, tiny_args
from tramontane.errors import CheckpointError, ConfigError
from tramontane.finetune.adapter import (
    load_adapter,
    load_model_with_adapter,
    merge_adapter_checkpoint,
    save_adapter,
)
from tramontane.finetune.lora import LoraConfig, LoraLinear, add_lora, lora_modules, lora_state_dict
from tramontane.models.checkpoint import load_model, save_model
from tramontane.models.transformer import Transformer

ATOL = 1e-5
SEQ = 12  # > the window (8): the sliding-window path runs
KINDS = {"mistral": tiny_args(), "mixtral": tiny_args(moe=True, sliding_window=None)}
HF_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """kind -> a random checkpoint in HF format (written by our save_model)."""
    out = {}
    for seed, (kind, args) in enumerate(KINDS.items()):
        out[kind] = save_model(random_model(args, seed=seed), tmp_path_factory.mktemp(kind) / "base",
                               format="hf")
    return out


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 97, (2, SEQ), generator=torch.Generator().manual_seed(0))


def _randomize(model: nn.Module, seed: int) -> None:
    """Non-zero random lora_A and lora_B (PEFT's or ours), from a fixed generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def _hf(base: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager").eval()


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


def _ours(base: Path) -> Transformer:
    model, _ = load_model(base)
    return model.eval()


def _our_adapter(base: Path, config: LoraConfig, out: Path, seed: int = 3) -> Transformer:
    """Our model on `base` with random adapters per `config`, saved to `out`."""
    model = add_lora(_ours(base), config)
    _randomize(model, seed)
    save_adapter(model, out, config, base_model_name_or_path=str(base))
    return model


def _peft_adapter(base: Path, out: Path, seed: int = 1, **options: object) -> torch.Tensor:
    """A random PEFT adapter on transformers' model of `base`, saved to `out`; returns PEFT's logits."""
    tokens = torch.randint(0, 97, (2, SEQ), generator=torch.Generator().manual_seed(0))
    model = get_peft_model(_hf(base), PeftLoraConfig(task_type="CAUSAL_LM", **options))
    _randomize(model, seed)
    model.save_pretrained(out)
    return _logits(model.eval(), tokens)


# ------------------------------------------------------------------------------------------ PEFT -> ours

PEFT_CASES = {
    "attention": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "all-rslora-dropout": {"r": 3, "lora_alpha": 5, "target_modules": HF_ALL, "use_rslora": True,
                           "lora_dropout": 0.1},
    "q-v-down": {"r": 2, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]},
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_adapter_gives_peft_logits(bases, tokens, tmp_path, case):
    options = PEFT_CASES[case]
    expected = _peft_adapter(bases["mistral"], tmp_path / "adapter", **options)
    model = _ours(bases["mistral"])
    config = load_adapter(model, tmp_path / "adapter")
    assert (config.rank, config.alpha, config.use_rslora) == (options["r"], options["lora_alpha"],
                                                              options.get("use_rslora", False))
    assert config.dropout == options.get("lora_dropout", 0.0)
    assert all(not m.training for m in lora_modules(model).values())  # follows the eval-mode model
    torch.testing.assert_close(_logits(model, tokens), expected, atol=ATOL, rtol=0)


def test_adapters_move_the_logits(bases, tokens, tmp_path):
    """Guards the power of the equivalence tests: the adapters change logits by far more than ATOL, and a
    lora_B of wq read without the rotary row permutation gives other logits."""
    expected = _peft_adapter(bases["mistral"], tmp_path / "adapter", **PEFT_CASES["attention"])
    assert (expected - _logits(_ours(bases["mistral"]), tokens)).abs().max() > 0.1
    model = _ours(bases["mistral"])
    load_adapter(model, tmp_path / "adapter")
    wq = model.layers[0].attention.wq
    assert isinstance(wq, LoraLinear)
    from tramontane.models.checkpoint import permute_to_hf  # undo our permutation: what a naive loader gets

    with torch.no_grad():
        wq.lora_B.weight.copy_(permute_to_hf(wq.lora_B.weight.clone(), model.args.n_heads))
    assert (_logits(model, tokens) - expected).abs().max() > 1e-3


def test_load_model_with_adapter(bases, tokens, tmp_path):
    expected = _peft_adapter(bases["mistral"], tmp_path / "adapter", **PEFT_CASES["all-rslora-dropout"])
    model, args = load_model_with_adapter(bases["mistral"], tmp_path / "adapter")
    assert not model.training and args == model.args
    torch.testing.assert_close(_logits(model, tokens), expected, atol=ATOL, rtol=0)
    # bfloat16 base, float32 adapters: runs, and stays within bfloat16's rounding (a few percent here)
    low, _ = load_model_with_adapter(bases["mistral"], tmp_path / "adapter", dtype="bfloat16")
    assert low.dtype == torch.bfloat16
    assert all(m.lora_A.weight.dtype == torch.float32 for m in lora_modules(low).values())
    assert (_logits(low, tokens) - expected).norm() < 0.1 * expected.norm()


# ------------------------------------------------------------------------------------------ ours -> PEFT

OUR_CASES = {
    "mistral-attention-mlp": ("mistral", LoraConfig(rank=4, alpha=8, targets=("attention", "mlp"))),
    "mistral-rslora": ("mistral", LoraConfig(rank=3, alpha=6, targets=("wq", "wk", "w2"), use_rslora=True)),
    "mixtral-experts": ("mixtral", LoraConfig(rank=2, alpha=4, targets=("wq", "wv", "experts"))),
}


# PEFT on transformers 5 converts the per-expert Mixtral layout into its fused one (rank 2r for gate_up_proj),
# warning on the way that the rank pattern it just made "matched no module" (it is applied all the same)
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")
@pytest.mark.parametrize("case", OUR_CASES)
def test_our_adapter_gives_our_logits_in_peft(bases, tokens, tmp_path, case):
    kind, config = OUR_CASES[case]
    ours = _our_adapter(bases[kind], config, tmp_path / "adapter")
    peft = PeftModel.from_pretrained(_hf(bases[kind]), tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(peft, tokens), _logits(ours, tokens), atol=ATOL, rtol=0)
    assert (_logits(ours, tokens) - _logits(_ours(bases[kind]), tokens)).abs().max() > 0.1  # adapters matter
    # and back: our loader reads what we wrote, to the bit
    again = _ours(bases[kind])
    assert load_adapter(again, tmp_path / "adapter") == config
    for name, tensor in lora_state_dict(ours).items():
        assert torch.equal(lora_state_dict(again)[name], tensor), name


def test_our_files_are_peft_files(bases, tmp_path):
    """The same tensor names as PEFT's save_pretrained writes for the same targets, and every key of its
    adapter_config.json (its version aside), the adapter-specific ones with the same values. A PEFT release
    newer than the writer may add options; each must be written switched off (None, False, empty), so the
    file we write still describes the same adapter to it."""
    _peft_adapter(bases["mistral"], tmp_path / "peft", r=4, lora_alpha=8, target_modules=HF_ALL)
    _our_adapter(bases["mistral"], LoraConfig(rank=4, alpha=8, targets=("all",)), tmp_path / "ours")
    theirs, ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    their_config, our_config = (json.loads((tmp_path / d / "adapter_config.json").read_text())
                                for d in ("peft", "ours"))
    assert set(our_config) <= set(their_config) - {"peft_version"}, "we write options PEFT does not know"
    newer = set(their_config) - set(our_config) - {"peft_version"}
    assert all(their_config[key] in (None, False, {}, [], "") for key in newer), \
        {key: their_config[key] for key in newer}
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "fan_in_fan_out",
                "use_rslora", "use_dora", "inference_mode", "rank_pattern", "alpha_pattern"):
        assert our_config[key] == their_config[key], key
    assert sorted(our_config["target_modules"]) == sorted(their_config["target_modules"])


def test_mixtral_expert_names(bases, tmp_path):
    """Experts in transformers 4's per-expert layout (block_sparse_moe.experts.E.wK); the router untouched."""
    _our_adapter(bases["mixtral"], LoraConfig(rank=2, targets=("experts",)), tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.1.block_sparse_moe.experts.3.w2.lora_B.weight" in keys
    assert len(keys) == 2 * 2 * 4 * 3  # layers x experts x (w1 w2 w3) x (A, B)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["w1", "w2", "w3"]


# ----------------------------------------------------------------------------------------------- merging

@pytest.mark.parametrize("fmt", ["hf", "consolidated"])
@pytest.mark.parametrize("kind", KINDS)
def test_merged_checkpoint_gives_adapted_logits(bases, tokens, tmp_path, kind, fmt):
    base = tmp_path / "base"
    shutil.copytree(bases[kind], base)
    (base / "tekken.json").write_text('{"not": "a real tokenizer"}')  # copied as is, never parsed
    config = LoraConfig(rank=4, alpha=8, targets=("all",))
    adapted = _our_adapter(base, config, tmp_path / "adapter")
    out = merge_adapter_checkpoint(base, tmp_path / "adapter", tmp_path / "merged", fmt,
                                   extra_json={"ledger.json": {"steps": 3}})
    assert (out / ("params.json" if fmt == "consolidated" else "config.json")).is_file()
    assert (out / "tekken.json").read_bytes() == (base / "tekken.json").read_bytes()
    assert json.loads((out / "ledger.json").read_text()) == {"steps": 3}
    merged, _ = load_model(out)
    assert not lora_modules(merged)
    torch.testing.assert_close(_logits(merged, tokens), _logits(adapted, tokens), atol=ATOL, rtol=0)
    with pytest.raises(CheckpointError, match="not empty"):
        merge_adapter_checkpoint(base, tmp_path / "adapter", out, fmt)


# ---------------------------------------------------------------------------------------------- refusals

def _edit_config(adapter: Path, **changes: object) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture
def peft_adapter(bases, tmp_path) -> Path:
    _peft_adapter(bases["mistral"], tmp_path / "adapter", r=4, lora_alpha=8, target_modules=HF_ALL)
    return tmp_path / "adapter"


def _refused(base: Path, adapter: Path, error: type[Exception], match: str) -> None:
    model = _ours(base)
    with pytest.raises(error, match=match):
        load_adapter(model, adapter)
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())  # untouched


def test_rank_in_config_differs_from_weights(bases, peft_adapter):
    _edit_config(peft_adapter, r=8)
    _refused(bases["mistral"], peft_adapter, CheckpointError, r"says r=8 but .* rank \[4\]")


def test_adapter_of_another_model_size(bases, tmp_path):
    others = (tiny_args(dim=32, head_dim=8), tiny_args(n_layers=3), tiny_args(hidden_dim=64))
    for i, other in enumerate(others):
        base = save_model(random_model(other), tmp_path / f"other{i}", format="hf")
        _our_adapter(base, LoraConfig(rank=4, targets=("all",)), tmp_path / f"adapter{i}")
        _refused(bases["mistral"], tmp_path / f"adapter{i}", CheckpointError,
                 "does not fit the model .*another base model")


def test_missing_and_unknown_tensors(bases, peft_adapter):
    weights = peft_adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    save_file(tensors, weights)
    _refused(bases["mistral"], peft_adapter, CheckpointError, "missing tensor.*layers.1.mlp.up_proj.lora_B")
    tensors = load_file(weights) | {
        "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
        "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight": torch.zeros(96, 4)}
    save_file(tensors, weights)
    _refused(bases["mistral"], peft_adapter, CheckpointError, "unexpected tensor.*lm_head")
    named = {k.replace(".lora_A.", ".lora_A.default."): v for k, v in load_file(weights).items()}
    save_file(named, weights)
    _refused(bases["mistral"], peft_adapter, CheckpointError, "adapter name")


@pytest.mark.parametrize(("changes", "match"), [
    ({"peft_type": "LOHA"}, "peft_type 'LOHA'"),
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias"),
    ({"target_modules": ["q_proj", "lm_head"]}, "'lm_head' cannot be adapted"),
    ({"target_modules": ["q_proj", "gate"]}, "router"),
    ({"target_modules": ".*proj"}, "regular expression"),
    ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"init_lora_weights": "pissa"}, "rewrites the base"),
    ({"task_type": "SEQ_CLS"}, "CAUSAL_LM"),
])
def test_unsupported_config_is_refused(bases, peft_adapter, changes, match):
    _edit_config(peft_adapter, **changes)
    _refused(bases["mistral"], peft_adapter, ConfigError, match)


def test_target_vocabulary():
    with pytest.raises(ConfigError, match="unknown LoRA target 'lm_head'"):
        LoraConfig(targets=("wq", "lm_head"))
    with pytest.raises(ConfigError, match="router"):
        LoraConfig(targets=("gate",))
    for bad in ({"rank": 0}, {"rank": 2.0}, {"alpha": 0}, {"dropout": 1.0}, {"targets": ()}):
        with pytest.raises(ConfigError):
            LoraConfig(**bad)  # type: ignore[arg-type]
    # configs adapting the same layers compare equal, however spelled
    assert LoraConfig(targets=("attention",)) == LoraConfig(targets=("wo", "wq", "wk", "wv", "wq"))
    assert LoraConfig(targets=("all",)) == LoraConfig(targets=("attention", "mlp")) == LoraConfig(
        targets=("wq", "wk", "wv", "wo", "experts"))
    assert LoraConfig(targets=("all",)) != LoraConfig(targets=("attention", "w1"))
    assert LoraConfig(rank=4) != LoraConfig(rank=4, use_rslora=True)
    assert LoraConfig(targets=("wq", "wq")).targets == ("wq",)


def test_targets_must_match_the_model(bases):
    dense, moe = _ours(bases["mistral"]), _ours(bases["mixtral"])
    with pytest.raises(ConfigError, match="mixture of experts: target 'experts'"):
        add_lora(moe, LoraConfig(targets=("wq", "mlp")))
    with pytest.raises(ConfigError, match="no mixture of experts"):
        add_lora(dense, LoraConfig(targets=("experts",)))
    assert not lora_modules(moe) and not lora_modules(dense)
    # `w1` is every FFN's w1 (PEFT's suffix rule): the dense one, or every expert's
    add_lora(moe, LoraConfig(targets=("w1",)))
    assert sorted(lora_modules(moe)) == sorted(f"layers.{i}.feed_forward.experts.{e}.w1"
                                               for i in range(2) for e in range(4))
    assert not any(isinstance(m, LoraLinear) for m in moe.layers[0].feed_forward.gate.modules())
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        add_lora(moe, LoraConfig(targets=("wq",)))


def test_save_adapter_refuses_mismatched_config_and_nonempty_folder(bases, tmp_path):
    config = LoraConfig(rank=4, targets=("attention",))
    model = _our_adapter(bases["mistral"], config, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="not empty"):
        save_adapter(model, tmp_path / "adapter", config)
    save_adapter(model, tmp_path / "adapter", config, overwrite=True)
    with pytest.raises(ConfigError, match="rank 4"):
        save_adapter(model, tmp_path / "other", LoraConfig(rank=8, targets=("attention",)))
    with pytest.raises(ConfigError, match="do not match"):
        save_adapter(model, tmp_path / "other", LoraConfig(rank=4, targets=("wq",)))
    with pytest.raises(ConfigError, match="extra_json"):
        save_adapter(model, tmp_path / "other", config, extra_json={"../escape.json": {}})
    assert not (tmp_path / "other").exists()
