"""The atom system end to end: compiling documents (long ones too), the baselines, and the memory budget."""

import json
import pathlib

import numpy as np
import pytest

from doc2atom_jax.atoms import atomize, bank as bank_lib, compose, pipeline
from doc2atom_jax.atoms import compiler as compiler_lib
from doc2atom_jax.errors import UserError
from doc2atom_jax.models import base
from doc2atom_jax.models import config as config_lib

QA = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "qa"
TEXT = ("Velkor Amsten was born in 1943. He founded the Tarnow Institute in Daskel. The institute has 412 "
        "employees. Daskel is a coastal city in Vorland. Mira Oskel won the Halden Prize in 1988.")


def tiny_system(method="doc2atom", rank=1, context=None, **method_kw):
  overrides = {"max_position_embeddings": context} if context else {}
  model = base.tiny_random("llama", **overrides)
  cfg = compiler_lib.config_for(model.config, rank=rank, code_dim=32, width=32, key_dim=16, num_blocks=1,
                                num_heads=2)
  return pipeline.AtomSystem.create(model, cfg, pipeline.MethodConfig(method=method, **method_kw))


def test_compiled_document_has_one_code_and_key_per_atom():
  system = tiny_system()
  doc = system.compile_document(TEXT, "d0")
  assert len(doc.atoms) == 5 and [a.type for a in doc.atoms][:2] == ["temporal", "relation"]
  assert doc.codes.shape == (5, system.cfg.num_layers, 1, 1, 32) and doc.keys.shape == (5, 16)
  assert np.isfinite(doc.codes).all() and np.isfinite(doc.keys).all()
  # Atoms are spans of one document encoding: compiling a document twice gives the same codes.
  np.testing.assert_array_equal(doc.codes, system.compile_document(TEXT, "d0").codes)


def test_document_longer_than_the_context_is_encoded_in_chunks():
  system = tiny_system(context=128)  # byte-level tokens: this text is ~1,500 tokens
  text = " ".join(f"Fact {i}: the tower number {i} stands {i * 7} metres tall in Orvale." for i in range(30))
  doc = system.compile_document(text, "long")
  split = system.split(text, "long")
  atomize.check_tiling(split)
  assert split.atoms[-1].token_end > 128 * 10
  covered = "".join(text[a.char_start:a.char_end] for a in split.atoms)
  assert covered.replace(" ", "") == text.replace(" ", "")  # every character once, in order
  assert np.isfinite(doc.codes).all() and doc.codes.shape[0] == len(split.atoms)


def test_empty_document_is_refused():
  with pytest.raises(UserError, match="empty"):
    tiny_system().compile_document("   \n ", "blank")
  with pytest.raises(UserError, match="empty"):
    tiny_system("d2l", rank=8).compile_document("", "blank")


def test_d2l_chunks_and_baselines_compose_every_adapter_of_the_document(tmp_path):
  system = tiny_system("d2l", rank=8, chunk_tokens=64)
  doc = system.compile_document(TEXT, "d0")
  lengths = [a.token_end - a.token_start for a in doc.atoms]
  # Fixed-length chunks; a boundary space token moves to the next chunk (the atomizer's whitespace rule).
  assert all(abs(n - 64) <= 1 for n in lengths[:-1]) and sum(lengths) == len(TEXT)
  assert doc.codes.shape[3] == 8  # rank 8 per chunk
  bank_lib.create(tmp_path / "b", fingerprint=system.fingerprint, meta={})
  bank_lib.append(tmp_path / "b", doc, fingerprint=system.fingerprint)
  bank = bank_lib.load(tmp_path / "b", fingerprint=system.fingerprint)
  idx, w, abstain = system.select(bank, ["Who founded it?", "When?"])
  assert idx.tolist() == [list(range(len(doc.atoms)))] * 2 and (w == 1).all() and not abstain.any()
  adapter = system.adapter(bank, idx, w)
  assert adapter.factors["down"].a.shape[2] == len(doc.atoms) * 8 + system.cfg.default_rank  # rank-concatenated


def test_ask_routes_over_a_bank_of_several_documents(tmp_path):
  system = tiny_system(k=3)
  path = tmp_path / "bank"
  bank_lib.create(path, fingerprint=system.fingerprint, meta={})
  for i, text in enumerate([TEXT, "Orlen is a small moon. It has 3 craters."]):
    bank_lib.append(path, system.compile_document(text, f"d{i}"), fingerprint=system.fingerprint)
  bank = bank_lib.load(path, fingerprint=system.fingerprint)
  results = system.answer(bank, ["Who founded the Tarnow Institute?", "How many craters?"], max_new_tokens=3)
  for r in results:
    assert len(r["atoms"]) == 3 and abs(sum(a["weight"] for a in r["atoms"]) - 1) < 1e-5
    for a in r["atoms"]:
      assert a["atom"] == "null" or a["atom"]["text"] == bank.texts[a["atom"]["doc_id"]][slice(*a["atom"]["chars"])]


def atom_bytes_report(name, model_cfg, rank, code_dim, tokens, atoms):
  codes = bank_lib.bytes_per_atom((model_cfg.num_layers, 1, rank, code_dim), "bfloat16", key_dim=128)
  d_in, d_out = model_cfg.target_dims("down")
  factors = model_cfg.num_layers * rank * (d_in + d_out) * 2  # bf16 A and B
  kv = config_lib.kv_cache_bytes(model_cfg, tokens)
  print(f"{name}: per atom {codes:,} B as codes+key vs {factors:,} B as factors ({factors / codes:.1f}x); "
        f"{atoms} atoms of a {tokens}-token document: {atoms * codes / 1e6:.2f} MB = "
        f"{100 * atoms * codes / kv:.1f}% of the {kv / 1e6:.1f} MB in-context KV cache")
  return codes, factors, atoms * codes / kv


def test_bytes_per_atom_and_per_document(smollm2):
  # A 2,048-token document made of real SQuAD contexts, atomized with SmolLM2's tokenizer.
  contexts = []
  for line in (QA / "squad.dev.jsonl").read_text().splitlines():
    c = json.loads(line)["context"]
    if c not in contexts:
      contexts.append(c)
  text = ""
  for c in contexts:
    if len(smollm2.encode(text + "\n\n" + c)) > 2048:
      break
    text = (text + "\n\n" + c).strip()
  doc = atomize.atomize(text, "squad-2k", smollm2.tokenizer)
  tokens = len(doc.token_ids)
  assert 1500 < tokens <= 2048
  atoms = round(len(doc.atoms) * 2048 / tokens)  # scaled to exactly 2,048 tokens
  _, _, share = atom_bytes_report("SmolLM2-135M r=1 c=256", smollm2.config, 1, 256, 2048, atoms)
  assert share < 0.05

  gemma2_2b = config_lib.DecoderConfig(
      model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_layers=26,
      num_heads=8, num_kv_heads=4, head_dim=256, rms_norm_eps=1e-6, max_position_embeddings=8192,
      layer_types=("sliding_attention", "full_attention") * 13, rope_full=config_lib.RopeSpec(1e4),
      rope_sliding=config_lib.RopeSpec(1e4), sliding_window=4096)
  codes, factors, share = atom_bytes_report("Gemma-2-2B r=2 c=512", gemma2_2b, 2, 512, 2048, atoms)
  assert factors >= 10 * codes
  assert share < 0.05


def test_bad_method_settings():
  with pytest.raises(UserError, match="unknown method"):
    pipeline.MethodConfig(method="rag")
  with pytest.raises(UserError, match="normalization"):
    pipeline.MethodConfig(normalization="max")
  assert compose.NULL_INDEX == -1
