"""The atom system end to end: split -> encode -> compile -> bank, and question -> route -> compose -> answer.

One `AtomSystem` holds the frozen base model, the compiler and the router, and a method:
- `doc2atom`: rule-based atoms; the learned router's scores, fused with BM25 and the answer type, pick the
  top-k; abstention reads the document (atoms/fusion.py; v1: the null atom competes, first = abstain);
- `d2l`: Doc-to-LoRA — fixed-length chunks (or the whole document), all chunk adapters of the document
  rank-concatenated at equal weight, no router;
- `d2l_atom`: doc2atom's atoms, all composed at equal weight, no router (isolates the router).
"""

import dataclasses
import functools
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from doc2atom_jax import shapes
from doc2atom_jax.atoms import atomize, bank as bank_lib, chunk, compose, encode, fusion
from doc2atom_jax.atoms import compiler as compiler_lib
from doc2atom_jax.atoms import router as router_lib
from doc2atom_jax.data import prompts
from doc2atom_jax.errors import UserError

METHODS = ("doc2atom", "d2l", "d2l_atom")
ATOM_BUCKET = 16  # atoms per document are padded to a multiple of this when compiling
QUESTION_BUCKET = 32  # question prompts (routing) are padded to a multiple of this


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  method: str = "doc2atom"
  min_atom_tokens: int = 4
  max_atom_tokens: int = 48
  chunk_tokens: int = 0  # d2l: tokens per chunk, 0 = the whole document
  k: int = 4
  normalization: str = "softmax"
  max_chunk_tokens: int = 0  # encoding chunk for long documents; 0 = the model's context
  route_approx: bool = False  # doc2atom's top-k by jax.lax.approx_max_k (router.top_k; approximate on TPU only)
  route_score: str = "fused"  # dense (the router alone) | fused (+ BM25 and answer type: atoms/fusion.py)
  abstain: str = "evidence"  # evidence (lexical + calibrated margin: atoms/fusion.py) | null (v1: null ranks first)
  abstain_margin: float = float("-inf")  # evidence: refuse below this dense margin over the null (the export's)
  second_hop: str = "names"  # fused: names (a bridge's names find a two-hop answer: atoms/fusion.py) | off

  def __post_init__(self):
    if self.method not in METHODS:
      raise UserError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
    if self.normalization not in router_lib.NORMALIZATIONS:
      raise UserError(f"unknown normalization {self.normalization!r}; valid: {', '.join(router_lib.NORMALIZATIONS)}")
    if self.k < 1:
      raise UserError(f"k must be >= 1, got {self.k}")
    if self.route_score not in fusion.ROUTE_SCORES:
      raise UserError(f"unknown atoms.route_score {self.route_score!r}; valid: {', '.join(fusion.ROUTE_SCORES)}")
    if self.abstain not in fusion.ABSTAIN:
      raise UserError(f"unknown atoms.abstain {self.abstain!r}; valid: {', '.join(fusion.ABSTAIN)}")
    if self.second_hop not in fusion.SECOND_HOPS:
      raise UserError(f"unknown atoms.second_hop {self.second_hop!r}; valid: {', '.join(fusion.SECOND_HOPS)}")

  @property
  def v1_routing(self) -> bool:
    """The router alone, the null atom competing in the top-k: the jitted path (sharded banks, approx top-k)."""
    return self.route_score == "dense" and self.abstain == "null"


@dataclasses.dataclass
class AtomSystem:
  model: object  # models.BaseModel
  compiler: compiler_lib.AtomCompiler
  router: router_lib.Router
  method: MethodConfig

  @classmethod
  def create(cls, model, compiler_cfg: compiler_lib.CompilerConfig, method: MethodConfig, seed: int = 0):
    rngs = nnx.Rngs(seed)
    compiler = compiler_lib.AtomCompiler(compiler_cfg, rngs=rngs)
    compiler.set_statistics(*encode.calibration_statistics(model))
    if compiler_cfg.copy_dim:
      compiler.set_copy_basis(encode.embedding_basis(model.weights["embed"], compiler_cfg.copy_dim))
    return cls(model, compiler, router_lib.Router(compiler_cfg, rngs=rngs), method)

  @property
  def cfg(self) -> compiler_lib.CompilerConfig:
    return self.compiler.cfg

  @functools.cached_property
  def fingerprint(self) -> str:
    """sha256 of what makes a bank: base model (name, config), compiler and router (config, parameters)
    and how documents are split. Routing settings (k, normalization) are free at ask time."""
    m = self.method
    splitting = [m.method, m.min_atom_tokens, m.max_atom_tokens, m.chunk_tokens, m.max_chunk_tokens]
    h = hashlib.sha256()
    h.update(json.dumps([self.model.name, repr(self.model.config), repr(self.cfg), splitting]).encode())
    for leaf in jax.tree.leaves(nnx.state((self.compiler, self.router))):
      h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return h.hexdigest()

  # -- compile ------------------------------------------------------------------------------------------
  def split(self, text: str, doc_id: str) -> atomize.AtomizedDocument:
    if self.method.method == "d2l":
      return chunk.chunk_document(text, doc_id, self.model.tokenizer, self.method.chunk_tokens)
    return atomize.atomize(text, doc_id, self.model.tokenizer, min_atom_tokens=self.method.min_atom_tokens,
                           max_atom_tokens=self.method.max_atom_tokens)

  def compile_document(self, text: str, doc_id: str,
                       split: atomize.AtomizedDocument | None = None) -> bank_lib.BankDocument:
    """One frozen pass over the document + one compiler call for all its atoms (padded, masked). `split` is
    `self.split(text, doc_id)` where the caller has it already (mode=compile splits every document first)."""
    doc = split if split is not None else self.split(text, doc_id)
    states = encode.document_states(self.model, doc.token_ids, self.method.max_chunk_tokens or None)
    idx, mask = encode.span_indices(doc.atoms)
    n = len(doc.atoms)
    padded = shapes.multiple(n, ATOM_BUCKET)
    idx = np.pad(idx, ((0, padded - n), (0, 0)))
    mask = np.pad(mask, ((0, padded - n), (0, 0)))
    mask[n:, 0] = True  # padding atoms read one token so nothing divides by zero; dropped below
    types = np.zeros(padded, np.int32)
    types[:n] = [atomize.ATOM_TYPES.index(a.type) for a in doc.atoms]
    codes, keys = _compile_atoms(nnx.split(self.compiler), states, jnp.asarray(idx), jnp.asarray(mask),
                                 jnp.asarray(types))
    return bank_lib.BankDocument(doc_id=doc_id, text=text, atoms=doc.atoms,
                                 codes=np.asarray(codes[:n], np.float32), keys=np.asarray(keys[:n], np.float32))

  # -- answer -------------------------------------------------------------------------------------------
  def question_states(self, questions: list[str]):
    """Key-layer states of the questions alone in the chat template: ([B, T, d], the question's own tokens
    [B, T], which the router pools; `encode.question_ids`)."""
    seqs, own = encode.question_ids(self.model, questions)
    length = shapes.multiple(max(map(len, seqs)), QUESTION_BUCKET)
    tokens = np.zeros((len(seqs), length), np.int32)
    mask = np.zeros((len(seqs), length), bool)
    own_mask = np.zeros((len(seqs), length), bool)
    for i, (s, o) in enumerate(zip(seqs, own)):
      tokens[i, :len(s)], mask[i, :len(s)], own_mask[i, :len(s)] = s, True, o
    layer = self.cfg.layer_for_keys
    states = encode.layer_states_jit(self.model.weights, self.model.config, jnp.asarray(tokens),
                                     jnp.asarray(mask), layers=(layer,))
    return self.compiler.standardize(states, (layer,))[0], jnp.asarray(own_mask)

  def select(self, bank: bank_lib.AtomBank, questions: list[str], doc_id: str | None = None):
    """(indices [B, k'], weights [B, k'], abstain [B]) over the bank's rows.

    doc2atom routes over the whole bank; d2l and d2l_atom take every atom of `doc_id` at weight 1.
    """
    batch = len(questions)
    if self.method.method != "doc2atom":
      if doc_id is None:
        if len(bank.doc_ids) != 1:
          raise UserError(f"method {self.method.method} composes one document's adapters: name the document "
                          f"(ask.doc_id), one of {', '.join(bank.doc_ids[:5])}{'...' if len(bank.doc_ids) > 5 else ''}")
        doc_id = bank.doc_ids[0]
      if doc_id not in bank.doc_ids:
        raise UserError(f"document {doc_id!r} is not in the bank")
      j = bank.doc_ids.index(doc_id)
      rows = np.arange(bank.doc_offsets[j], bank.doc_offsets[j + 1])
      return (np.broadcast_to(rows, (batch, len(rows))), np.ones((batch, len(rows)), np.float32),
              np.zeros(batch, bool))
    states, q_own = self.question_states(questions)
    m = self.method
    if m.v1_routing:
      _, keys, mask = bank.padded()
      indices, weights, abstain = _route(nnx.split(self.router), states, q_own, jnp.asarray(keys), jnp.asarray(mask),
                                         self.compiler.null()[1], k=m.k, normalization=m.normalization,
                                         approximate=m.route_approx)
      return np.asarray(indices), np.asarray(weights), np.asarray(abstain)
    scores = np.asarray(self.scores(bank, questions, (states, q_own)))
    return fusion.select(scores, questions, self.lexicon(bank), k=m.k, route_score=m.route_score,
                         abstain=m.abstain, margin=m.abstain_margin, second_hop=m.second_hop,
                         normalize=lambda top: router_lib.normalize(top, m.normalization))

  def scores(self, bank: bank_lib.AtomBank, questions: list[str], question_states=None):
    """The router's dense scores [B, N_padded + 1] over the bank's atoms (padding -inf, the null atom last)."""
    _, keys, mask = bank.padded()
    states, q_own = question_states or self.question_states(questions)
    return _scores(nnx.split(self.router), states, q_own, jnp.asarray(keys), jnp.asarray(mask),
                   self.compiler.null()[1])

  @staticmethod
  def lexicon(bank: bank_lib.AtomBank) -> fusion.Lexicon:
    """The bank's lexical view (BM25, resolved atom texts, types), built once per loaded bank."""
    if bank._lexicon is None:  # pylint: disable=protected-access
      bank._lexicon = fusion.Lexicon.of(bank.atoms, [bank.texts[d] for d in bank.doc_ids])  # pylint: disable=protected-access
    return bank._lexicon  # pylint: disable=protected-access

  def adapter(self, bank: bank_lib.AtomBank, indices, weights):
    codes, _, _ = bank.padded()
    default = self.compiler.default_codes[...] if self.cfg.default_rank else None
    return compose.adapter_from_bank(self.compiler.head(), jnp.asarray(codes), jnp.asarray(indices),
                                     jnp.asarray(weights), self.compiler.null()[0], default, alpha=self.cfg.alpha,
                                     targets=self.cfg.targets)

  def answer(self, bank: bank_lib.AtomBank, questions: list[str], *, doc_id: str | None = None,
             max_new_tokens: int = 24, stop: bool = True, answer_prefixes=None) -> list[dict]:
    """Answers with the composed adapter, the atoms used (text spans, weights) and abstentions. stop=False
    generates exactly `max_new_tokens` (the benchmark times this path, as a user's `ask` runs it).
    answer_prefixes: the start of each answer, prefilled (the router still reads the question alone)."""
    indices, weights, abstain = self.select(bank, questions, doc_id)
    answers = self.model.generate([prompts.question_prompt(q) for q in questions], max_new_tokens=max_new_tokens,
                                  adapter=self.adapter(bank, indices, weights), stop=stop,
                                  answer_prefixes=answer_prefixes)
    return [{"question": q, "answer": "unknown" if abst else a.strip(), "abstained": bool(abst),
             "model_answer": a.strip(), "atoms": atoms_used(bank, idx, w)}
            for q, a, idx, w, abst in zip(questions, answers, indices, weights, abstain)]


def atoms_used(bank: bank_lib.AtomBank, indices, weights) -> list[dict]:
  """One question's composition as `answer` and mode=export report it: the atoms of positive weight (the null
  atom as "null") with their provenance."""
  return [{"atom": "null" if i == compose.NULL_INDEX else _provenance(bank.atoms[i]), "weight": float(w)}
          for i, w in zip(np.asarray(indices).tolist(), np.asarray(weights).tolist()) if w > 0]


def _provenance(atom) -> dict:
  return {"doc_id": atom.doc_id, "index": atom.index, "type": atom.type, "text": atom.text,
          "chars": [atom.char_start, atom.char_end], "tokens": [atom.token_start, atom.token_end]}


@jax.jit
def _compile_atoms(split_compiler, states, idx, mask, types):
  compiler = nnx.merge(*split_compiler)
  codes, keys, _ = compiler(encode.gather_spans(states, idx, mask), mask, types)
  return codes, keys


@jax.jit
def _scores(split_router, states, q_own, keys, key_mask, null_key):
  router = nnx.merge(*split_router)
  return router.scores(router.query(states, q_own), keys, key_mask, null_key)


@functools.partial(jax.jit, static_argnames=("k", "normalization", "approximate"))
def _route(split_router, states, q_own, keys, key_mask, null_key, *, k, normalization, approximate=False):
  router = nnx.merge(*split_router)
  scores = router.scores(router.query(states, q_own), keys, key_mask, null_key)
  return router_lib.select(scores, k, normalization, approximate=approximate)
