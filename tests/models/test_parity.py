"""Logits and hidden states match transformers' PyTorch models built from the same config and weights."""

import numpy as np
import pytest

import jax.numpy as jnp

from doc2atom_jax.models import config as config_lib
from doc2atom_jax.models import decoder, hf_weights, tiny

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
LENGTH = 20  # > the tiny Gemma sliding window (6)


def torch_model(family: str):
  """A transformers model of the tiny config with weights drawn large enough to give O(1) logits."""
  hf_cfg = tiny.hf_config(family)
  hf_cfg._attn_implementation = "eager"
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # perturb norms so the (1 + w) offset of Gemma is exercised
        p.copy_(p + 0.1 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.15 * torch.randn(p.shape, generator=gen))
  return hf_cfg, model


def padded_batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, tiny.TINY_VOCAB, size=(3, LENGTH)).astype(np.int32)
  mask = np.ones((3, LENGTH), bool)
  mask[1, :7] = False  # left padding
  mask[2, 13:] = False  # right padding
  return tokens, mask


def torch_forward(model, tokens, mask):
  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask.astype(np.int64)),
                position_ids=torch.tensor(positions), output_hidden_states=True)
  return out.logits.numpy(), np.stack([h.numpy() for h in out.hidden_states])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scan", [False, True])
def test_logits_match_transformers(family, scan):
  hf_cfg, model = torch_model(family)
  cfg = config_lib.from_hf_config(hf_cfg, scan_layers=scan)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  weights = hf_weights.from_hf_state_dict(state, cfg)
  tokens, mask = padded_batch()

  ref_logits, ref_hidden = torch_forward(model, tokens, mask)
  out = decoder.forward(weights, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask),
                        return_hidden_states=True)

  logits = np.asarray(out.logits)
  assert np.abs(ref_logits).max() > 1.0  # the comparison is not between near-zero numbers
  np.testing.assert_allclose(logits[mask], ref_logits[mask], atol=1e-4, rtol=0)
  hidden = np.asarray(out.hidden_states)
  assert hidden.shape == ref_hidden.shape == (cfg.num_layers + 1, 3, LENGTH, cfg.hidden_size)
  np.testing.assert_allclose(hidden[:, mask], ref_hidden[:, mask], atol=1e-4, rtol=1e-4)


def test_state_dict_round_trip():
  hf_cfg, model = torch_model("gemma3")
  cfg = config_lib.from_hf_config(hf_cfg)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  back = hf_weights.to_hf_state_dict(hf_weights.from_hf_state_dict(state, cfg), cfg)
  for name, value in back.items():
    np.testing.assert_array_equal(value, state[name])


def test_sliding_window_changes_the_output():
  """Guards the test above: on 20 tokens the window really masks something in the Gemma configs."""
  hf_cfg, model = torch_model("gemma2")
  cfg = config_lib.from_hf_config(hf_cfg)
  weights = hf_weights.from_hf_state_dict({k: v.detach().numpy() for k, v in model.state_dict().items()}, cfg)
  tokens, _ = padded_batch()
  windowed = decoder.forward(weights, cfg, jnp.asarray(tokens)).logits
  unwindowed = decoder.forward(weights, cfg.replace(sliding_window=None), jnp.asarray(tokens)).logits
  assert np.abs(np.asarray(windowed - unwindowed))[:, 6:].max() > 1e-3
  np.testing.assert_allclose(windowed[:, :6], unwindowed[:, :6], atol=1e-5)
