"""A composed adapter exported in PEFT's LoRA layout: reads back exactly, and PEFT itself applies it as we do."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from doc2atom_jax import peft_export
from doc2atom_jax.atoms import compose
from doc2atom_jax.errors import UserError
from doc2atom_jax.models import adapter as adapter_lib
from doc2atom_jax.models import base, decoder, hf_weights
from doc2atom_jax.models import config as config_lib

ALL = ("q", "k", "v", "o", "gate", "up", "down")


def random_adapter(cfg, batch, ranks, scale, seed=0):
  """ranks: {target: rank}; factors drawn large enough to change the logits visibly."""
  rng = np.random.default_rng(seed)
  factors = {}
  for t, rank in ranks.items():
    d_in, d_out = cfg.target_dims(t)
    factors[t] = adapter_lib.LoRA(jnp.asarray(rng.normal(0, 0.3, (batch, cfg.num_layers, rank, d_in)), jnp.float32),
                                  jnp.asarray(rng.normal(0, 0.3, (batch, cfg.num_layers, rank, d_out)), jnp.float32))
  return adapter_lib.Adapter(factors, scale)


def composed_adapter(cfg, targets, batch=2, k=3, rank=2, code=8, alpha=0.75, seed=0):
  """A real composition (`atoms.compose`): random head and codes, top-k weights, plus a default adapter."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(0, 0.4, shape), jnp.float32)
  L, n_t = cfg.num_layers, len(targets)
  head = {"a": [normal(L, code, cfg.target_dims(t)[0]) for t in targets],
          "b": [normal(L, code, cfg.target_dims(t)[1]) for t in targets],
          "scale_a": 1.0 + normal(L, n_t, rank), "scale_b": 1.0 + normal(L, n_t, rank)}
  weights = jnp.asarray(rng.dirichlet(np.ones(k), batch), jnp.float32)
  return compose.compose(head, normal(batch, k, L, n_t, rank, code), weights, normal(L, n_t, rank, code), alpha,
                         targets)


def tokens_for(cfg, batch, length=12, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(3, cfg.vocab_size, (batch, length)), jnp.int32)


# ---------------------------------------------------------------------------------------------------------
# Round trip through our own decoder.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,ranks,scale,example", [
    ("llama", {"down": 3}, 2.0, 0),
    ("llama", {"q": 2, "v": 4, "down": 3}, jnp.asarray([0.5, 1.5]), 1),  # per-example scale, mixed ranks
    ("gemma3", {"down": 2}, -0.5, 1),  # a scale <= 0 is folded into lora_B
])
def test_round_trip_gives_the_same_logits(tmp_path, family, ranks, scale, example):
  model = base.tiny_random(family)
  cfg, weights = model.config, model.weights
  adapter = random_adapter(cfg, 2, ranks, scale)
  tokens = tokens_for(cfg, 2)
  want = decoder.forward(weights, cfg, tokens, adapter=adapter).logits[example]

  peft_export.write_peft_adapter(tmp_path, adapter, cfg, example=example, base_model_name_or_path="tiny")
  back = peft_export.read_peft_adapter(tmp_path, cfg)
  got = decoder.forward(weights, cfg, tokens[example:example + 1], adapter=back).logits[0]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(np.asarray(want - decoder.forward(weights, cfg, tokens).logits[example])).max() > 1e-2

  config = json.loads((tmp_path / "adapter_config.json").read_text())
  rank = max(ranks.values())
  assert config["r"] == rank and sorted(back.factors) == sorted(ranks)
  s = float(np.asarray(scale)[example]) if np.ndim(scale) else float(scale)
  assert config["lora_alpha"] / config["r"] == pytest.approx(s if s > 0 else 1.0, rel=1e-7)
  assert not list(tmp_path.glob("*.tmp"))  # no temp files left behind


def test_round_trip_of_a_composed_adapter(tmp_path):
  model = base.tiny_random("llama")
  cfg, weights = model.config, model.weights
  adapter = composed_adapter(cfg, ("q", "v", "down"))
  assert adapter.factors["down"].a.shape == (2, cfg.num_layers, 3 * 2 + 2, cfg.intermediate_size)  # k·r + r0
  tokens = tokens_for(cfg, 2)
  want = decoder.forward(weights, cfg, tokens, adapter=adapter).logits
  for n in range(2):
    peft_export.write_peft_adapter(tmp_path / str(n), adapter, cfg, example=n)
    back = peft_export.read_peft_adapter(tmp_path / str(n), cfg)
    assert back.scale == pytest.approx(0.75)
    got = decoder.forward(weights, cfg, tokens[n:n + 1], adapter=back).logits[0]
    np.testing.assert_allclose(got, want[n], atol=1e-5, rtol=0)


def test_layout_matches_peft_conventions(tmp_path):
  cfg = base.tiny_random("llama").config
  adapter = random_adapter(cfg, 1, {"q": 2, "down": 2}, 0.5)
  peft_export.write_peft_adapter(tmp_path, adapter, cfg)
  state = load_file(str(tmp_path / "adapter_model.safetensors"))
  a, b = adapter.factors["down"]
  key = "base_model.model.model.layers.3.mlp.down_proj"
  np.testing.assert_array_equal(state[f"{key}.lora_A.weight"], a[0, 3])  # [r, d_in]
  np.testing.assert_array_equal(state[f"{key}.lora_B.weight"], np.asarray(b[0, 3]).T)  # [d_out, r]
  assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, cfg.hidden_size)
  assert len(state) == 2 * 2 * cfg.num_layers
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "bias",
                                 "fan_in_fan_out", "use_rslora")} == {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 1, "target_modules": ["q_proj", "down_proj"],
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False}


# ---------------------------------------------------------------------------------------------------------
# PEFT itself as the reference.
# ---------------------------------------------------------------------------------------------------------
def torch_reference(family):
  """transformers' model of the tiny config with O(1)-logit random weights (the parity tests'), and ours."""
  pytest.importorskip("torch")
  from tests.models.test_parity import torch_model

  hf_cfg, model = torch_model(family)
  cfg = config_lib.from_hf_config(hf_cfg)
  state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return model, cfg, hf_weights.from_hf_state_dict(state, cfg)


@pytest.mark.parametrize("family,ranks,scale,example", [
    ("llama", {"down": 4}, 2.0, 0),
    ("llama", {"q": 2, "v": 3, "down": 2}, jnp.asarray([0.5, 1.5]), 1),
    ("llama", {"down": 2}, -0.7, 1),
    ("gemma3", {t: 2 for t in ALL}, 0.3, 1),
])
def test_peft_applies_the_export_like_our_decoder(tmp_path, family, ranks, scale, example):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  ref, cfg, weights = torch_reference(family)
  adapter = random_adapter(cfg, 2, ranks, scale, seed=3)
  tokens = tokens_for(cfg, 2, length=16)
  ours = np.asarray(decoder.forward(weights, cfg, tokens, adapter=adapter).logits[example])
  assert np.abs(ours - np.asarray(decoder.forward(weights, cfg, tokens).logits[example])).max() > 0.05

  peft_export.write_peft_adapter(tmp_path, adapter, cfg, example=example)
  peft_model = peft.PeftModel.from_pretrained(ref, str(tmp_path)).eval()
  s = float(np.asarray(scale)[example]) if np.ndim(scale) else float(scale)
  layer = peft_model.base_model.model.model.layers[0]
  down = layer.mlp.down_proj
  assert down.scaling["default"] == pytest.approx(s if s > 0 else 1.0, rel=1e-6)
  with torch.no_grad():
    theirs = peft_model(input_ids=torch.tensor(np.asarray(tokens[example:example + 1]), dtype=torch.long)).logits
  np.testing.assert_allclose(theirs[0].numpy(), ours, atol=1e-4, rtol=0)

  merged = peft_model.merge_and_unload()
  modules = {t: m.removesuffix(".weight") for t, (m, _) in hf_weights.LAYER_TABLES[cfg.family].items() if t in ALL}
  for t, lora in adapter.factors.items():
    for i in range(cfg.num_layers):
      module = merged.model.layers[i].get_submodule(modules[t])
      delta = s * np.asarray(lora.a[example, i]).T @ np.asarray(lora.b[example, i])  # [d_in, d_out], ours
      np.testing.assert_allclose(module.weight.detach().numpy().T, np.asarray(weights["layers"][t][i]) + delta,
                                 atol=1e-5, rtol=0)


@pytest.mark.parametrize("extra", [
    dict(rank_pattern={"down_proj": 4}, alpha_pattern={"q_proj": 5.0}, layers_to_transform=[0, 2]),
    dict(use_rslora=True),
])
def test_reads_what_peft_saves(tmp_path, extra):
  """Adapters PEFT wrote itself (per-module ranks and alphas, rsLoRA, some layers only) read back faithfully."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  ref, cfg, weights = torch_reference("llama")
  lora_config = peft.LoraConfig(r=2, lora_alpha=3.0, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM",
                                init_lora_weights="gaussian", **extra)
  peft_model = peft.get_peft_model(ref, lora_config).eval()
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_" in name:
        p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
  peft_model.save_pretrained(str(tmp_path))
  tokens = tokens_for(cfg, 1, length=16)
  with torch.no_grad():
    theirs = peft_model(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long)).logits[0].numpy()

  back = peft_export.read_peft_adapter(tmp_path, cfg)
  ours = np.asarray(decoder.forward(weights, cfg, tokens, adapter=back).logits[0])
  assert np.abs(ours - np.asarray(decoder.forward(weights, cfg, tokens).logits[0])).max() > 0.05
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Clear errors.
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  cfg = base.tiny_random("llama").config
  folder = tmp_path_factory.mktemp("peft")
  peft_export.write_peft_adapter(folder, random_adapter(cfg, 1, {"q": 2, "down": 2}, 1.0), cfg)
  return cfg, folder


def copy_of(folder, dest):
  dest.mkdir()
  for f in folder.iterdir():
    (dest / f.name).write_bytes(f.read_bytes())
  return dest


def test_missing_folder_or_files(tmp_path, exported):
  cfg, folder = exported
  with pytest.raises(UserError, match="folder not found"):
    peft_export.read_peft_adapter(tmp_path / "nope", cfg)
  for name in ("adapter_config.json", "adapter_model.safetensors"):
    broken = copy_of(folder, tmp_path / name.split(".")[0])
    (broken / name).unlink()
    with pytest.raises(UserError, match=f"missing {name}"):
      peft_export.read_peft_adapter(broken, cfg)
  (broken / "adapter_model.bin").write_bytes(b"")
  with pytest.raises(UserError, match="adapter_model.bin is not supported"):
    peft_export.read_peft_adapter(broken, cfg)


def test_bad_config_and_corrupt_weights(tmp_path, exported):
  cfg, folder = exported
  bad = copy_of(folder, tmp_path / "bad")
  config = json.loads((bad / "adapter_config.json").read_text())
  for change, match in ((dict(peft_type="IA3"), "only LoRA"), (dict(use_dora=True), "DoRA"),
                        (dict(lora_alpha="x"), "'lora_alpha' must be a number"), (dict(r=3), "says r=3")):
    (bad / "adapter_config.json").write_text(json.dumps(config | change))
    with pytest.raises(UserError, match=match):
      peft_export.read_peft_adapter(bad, cfg)
  (bad / "adapter_config.json").write_text("{not json")
  with pytest.raises(UserError, match="not valid JSON"):
    peft_export.read_peft_adapter(bad, cfg)
  (bad / "adapter_config.json").write_text(json.dumps(config))
  (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00")
  with pytest.raises(UserError, match="cannot read safetensors"):
    peft_export.read_peft_adapter(bad, cfg)


def test_target_modules_the_model_does_not_have(tmp_path, exported):
  cfg, folder = exported
  bad = copy_of(folder, tmp_path / "bad")
  config = json.loads((bad / "adapter_config.json").read_text())
  (bad / "adapter_config.json").write_text(json.dumps(config | {"target_modules": ["q_proj", "fc1"]}))
  with pytest.raises(UserError, match="targets fc1"):
    peft_export.read_peft_adapter(bad, cfg)
  (bad / "adapter_config.json").write_text(json.dumps(config | {"target_modules": "all-linear"}))
  state = load_file(str(bad / "adapter_model.safetensors"))
  state["base_model.model.model.layers.0.mlp.fc1.lora_A.weight"] = np.zeros((2, 4), np.float32)
  save_file(state, str(bad / "adapter_model.safetensors"))
  with pytest.raises(UserError, match="modules this model's adapter hook does not have: mlp.fc1"):
    peft_export.read_peft_adapter(bad, cfg)
  # and on export: a target our hook does not know
  lm_head = adapter_lib.Adapter({"lm_head": random_adapter(cfg, 1, {"down": 2}, 1.0).factors["down"]}, 1.0)
  with pytest.raises(UserError, match="unknown adapter target"):
    peft_export.write_peft_adapter(tmp_path / "out", lm_head, cfg)


def test_adapter_of_a_different_base_model(tmp_path, exported):
  cfg, folder = exported
  with pytest.raises(UserError, match="different base model"):
    peft_export.read_peft_adapter(folder, cfg.replace(intermediate_size=96))
  with pytest.raises(UserError, match="only 2 layers"):
    peft_export.read_peft_adapter(folder, cfg.replace(num_layers=2))
  with pytest.raises(UserError, match="no .*_proj factors for layers \\[4, 5\\]"):
    peft_export.read_peft_adapter(folder, cfg.replace(num_layers=6))
  # an export whose adapter does not fit the config it is exported for
  other = random_adapter(cfg.replace(hidden_size=32, num_heads=2), 1, {"down": 2}, 1.0)
  with pytest.raises(UserError, match="a\\[batch, layers, rank, d_in\\]"):
    peft_export.write_peft_adapter(tmp_path / "out", other, cfg)
  with pytest.raises(UserError, match="example 1 is out of range"):
    peft_export.write_peft_adapter(tmp_path / "out", random_adapter(cfg, 1, {"down": 2}, 1.0), cfg, example=1)
  assert not (tmp_path / "out").exists()  # nothing written on a refused export
