"""Loading: local Hugging Face folders (sharded, bf16), bad folders, unknown names."""

import json

import numpy as np
import pytest

from doc2atom_jax import models
from doc2atom_jax.errors import UserError
from doc2atom_jax.models import tiny

torch = pytest.importorskip("torch")
import transformers  # noqa: E402


def save_hf_folder(path, family="qwen3", dtype=None, shard="40KB"):
  hf_cfg = tiny.hf_config(family)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 0.1)
  if dtype is not None:
    model = model.to(dtype)
  model.save_pretrained(path, max_shard_size=shard)
  tiny.byte_tokenizer().save_pretrained(path)
  return model


def test_hf_folder_with_sharded_safetensors_matches_torch(tmp_path):
  ref = save_hf_folder(tmp_path)
  assert (tmp_path / "model.safetensors.index.json").exists()  # really sharded
  model = models.load(f"hf:{tmp_path}")
  ids = model.encode("A folder of shards.")
  with torch.no_grad():
    expected = ref(torch.tensor([ids])).logits.numpy()
  np.testing.assert_allclose(np.asarray(model.logits(ids)), expected, atol=1e-4)
  assert model.tokenizer.decode(ids) == "A folder of shards."
  assert model.config.model_type == "qwen3" and model.config.qk_norm


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
  ref = save_hf_folder(tmp_path, family="llama", dtype=torch.bfloat16, shard="10GB")
  model = models.load(f"hf:{tmp_path}")
  embed = ref.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(model.weights["embed"]), embed)


def test_unknown_name_lists_the_valid_ones():
  with pytest.raises(UserError) as e:
    models.load("smollm3-7b")
  for name in ("smollm2-135m-instruct", "gemma3-270m", "hf:<folder>", "tiny-random-gemma2"):
    assert name in str(e.value)


def test_missing_or_half_written_folders(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    models.load(f"hf:{tmp_path / 'nowhere'}")
  with pytest.raises(UserError, match="no config.json"):
    models.load(f"hf:{tmp_path}")

  save_hf_folder(tmp_path)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  shard = tmp_path / sorted(set(index["weight_map"].values()))[-1]
  data = shard.read_bytes()
  shard.write_bytes(data[: len(data) // 2])  # a download cut in the middle
  with pytest.raises(UserError, match="truncated or corrupt"):
    models.load(f"hf:{tmp_path}")
  shard.unlink()
  with pytest.raises(UserError, match="incomplete, missing"):
    models.load(f"hf:{tmp_path}")


def test_folder_without_tokenizer_or_with_unsupported_architecture(tmp_path):
  save_hf_folder(tmp_path, shard="10GB")
  (tmp_path / "tokenizer.json").unlink()
  with pytest.raises(UserError, match="tokenizer"):
    models.load(f"hf:{tmp_path}")
  cfg = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt2"}))
  with pytest.raises(UserError, match="not supported"):
    models.load(f"hf:{tmp_path}")
