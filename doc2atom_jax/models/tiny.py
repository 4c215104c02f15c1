"""Tiny random models of every supported family, and a byte-level tokenizer for them (tests, CI smoke).

The configs are real transformers config objects, so a test can build transformers' PyTorch model from the
same config and weights and compare logits. Gemma configs use a 6-token sliding window so test sequences
cross it.
"""

from doc2atom_jax.errors import UserError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_VOCAB = 320  # 256 bytes + 3 specials, padded


def hf_config(family: str):
  """A transformers config object for a tiny random model of `family`."""
  import transformers

  common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=2, pad_token_id=0)
  rope = {"rope_type": "default", "rope_theta": 10000.0}
  if family == "llama":
    return transformers.LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=True)
  if family == "mistral":
    return transformers.MistralConfig(**common, rope_parameters=rope, tie_word_embeddings=False,
                                      sliding_window=None)
  if family == "qwen2":
    return transformers.Qwen2Config(**common, rope_parameters=rope, tie_word_embeddings=True)
  if family == "qwen3":
    return transformers.Qwen3Config(**common, rope_parameters=rope, tie_word_embeddings=False)
  if family == "gemma2":
    return transformers.Gemma2Config(**common, rope_parameters=rope, sliding_window=6, query_pre_attn_scalar=16,
                                     attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                     hidden_activation="gelu_pytorch_tanh")
  if family == "gemma3":
    return transformers.Gemma3TextConfig(
        **common | {"num_hidden_layers": 6}, sliding_window=6, query_pre_attn_scalar=16,
        hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
  raise UserError(f"unknown tiny family {family!r}; valid: {', '.join(FAMILIES)}")


def byte_tokenizer():
  """A byte-level BPE tokenizer with no merges (every byte one token) plus ChatML specials."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  byte_chars = pre_tokenizers.ByteLevel.alphabet()
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
  for ch in sorted(byte_chars):
    vocab[ch] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                 additional_special_tokens=["<|im_start|>"], chat_template=CHATML_TEMPLATE)
