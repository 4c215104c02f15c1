"""d2l trains on the units it compiles at evaluation (its chunks), with each question's evidence carried over;
doc2atom and d2l_atom keep the given atoms. A batch without the evidence teacher never computes it."""

import functools

import numpy as np
import pytest

from doc2atom_jax.atoms import chunk
from doc2atom_jax.data import synthetic
from doc2atom_jax.models import base
from doc2atom_jax.models.tiny import byte_tokenizer
from doc2atom_jax.train import batch as batch_lib
from doc2atom_jax.train import data as data_lib
from doc2atom_jax.train import teacher as teacher_lib


@pytest.fixture(scope="module")
def document():
  tokenizer = byte_tokenizer()
  doc = synthetic.document("train", 0, seed=0, facts_per_document=(8, 8), questions_per_document=8)
  return tokenizer, data_lib.to_train_document(doc, tokenizer)


def chunker(tokenizer, chunk_tokens):
  return functools.partial(chunk.chunk_document, tokenizer=tokenizer, chunk_tokens=chunk_tokens)


def test_whole_document_is_one_unit_holding_all_evidence(document):
  tokenizer, td = document
  assert len(td.doc.atoms) == 8
  units = data_lib.in_units(td, chunker(tokenizer, 0))
  assert len(units.doc.atoms) == 1 and units.doc.token_ids == td.doc.token_ids
  assert [q.question for q in units.questions] == [q.question for q in td.questions]
  labelled = [q for q in td.questions if q.evidence]
  assert labelled and any(q.out_of_scope for q in td.questions)
  for before, after in zip(td.questions, units.questions):
    assert after.evidence == ((0,) if before.evidence else None)
    assert (after.answer, after.out_of_scope) == (before.answer, before.out_of_scope)


def test_chunks_carry_exactly_the_overlapping_evidence(document):
  tokenizer, td = document
  units = data_lib.in_units(td, chunker(tokenizer, 64))  # byte tokens: a fact is ~40-70 tokens
  chunks = units.doc.atoms
  assert len(chunks) >= 4
  moved = 0
  for before, after in zip(td.questions, units.questions):
    if not before.evidence:
      assert after.evidence is None
      continue
    facts = [td.doc.atoms[i] for i in before.evidence]
    expected = tuple(j for j, c in enumerate(chunks)
                     if any(c.char_start < f.char_end and f.char_start < c.char_end for f in facts))
    assert after.evidence == expected
    for f in facts:  # every evidence character lies in one of the question's units
      covered = [(chunks[j].char_start, chunks[j].char_end) for j in after.evidence]
      assert all(any(s <= x < e for s, e in covered) for x in range(f.char_start, f.char_end)
                 if not td.doc.text[x].isspace())
    moved += after.evidence != before.evidence
  assert moved  # the indices are the chunks', not the facts'


def test_only_d2l_is_resplit(document):
  tokenizer, td = document
  split = chunker(tokenizer, 0)
  for method in ("doc2atom", "d2l_atom"):
    assert data_lib.method_units([td], method, split) == [td]
  (d2l,) = data_lib.method_units([td], "d2l", split)
  assert len(d2l.doc.atoms) == 1


def test_batch_without_the_evidence_teacher_leaves_it_uncomputed(tmp_path):
  model = base.tiny_random("llama")
  doc = synthetic.document("train", 1, seed=0, facts_per_document=(4, 4), questions_per_document=4)
  td = data_lib.to_train_document(doc, model.tokenizer)
  cache = teacher_lib.TeacherCache(tmp_path, "tiny", "template")
  without = batch_lib.build(model, [td], cache=cache, k=4, evidence_teacher=False)
  assert len(list(tmp_path.rglob("*.npz"))) == len(td.questions)  # the document teacher only
  assert not without["ev_teacher_logp"].any() and not without["ev_teacher_ids"].any()
  full = batch_lib.build(model, [td], cache=cache, k=4)
  assert len(list(tmp_path.rglob("*.npz"))) == 2 * len(td.questions)
  assert full["ev_teacher_logp"].any()
  for name in full:
    if not name.startswith("ev_teacher"):
      np.testing.assert_array_equal(full[name], without[name])


@pytest.mark.parametrize("variant", ["d2l", "d2l_atom"])
def test_the_training_job_compiles_the_methods_own_units(tmp_path, monkeypatch, variant):
  """modes.train end to end (tiny model, 2 steps): d2l's batches hold one unit per document (the whole
  document, as evaluation compiles it) and never the evidence teacher; d2l_atom's one atom per given fact."""
  from configs import tiny
  from doc2atom_jax import modes

  config = tiny.get_config(variant)
  config.unlock()
  config.train.steps, config.train.eval_every, config.eval.documents = 2, 0, 0
  config.data.source = "generator"
  seen = []
  build = batch_lib.build

  def spy(model, documents, **kw):
    seen.append(([len(d.doc.atoms) for d in documents], [len(d.doc.token_ids) for d in documents],
                 kw.get("evidence_teacher", True)))
    return build(model, documents, **kw)

  monkeypatch.setattr(batch_lib, "build", spy)
  modes.train(config, tmp_path)
  assert len(seen) == 2
  lo, hi = config.data.facts_per_document
  for units, _, evidence_teacher in seen:
    assert not evidence_teacher  # no atom-fidelity term without a router
    assert all(u == 1 for u in units) if variant == "d2l" else all(lo <= u <= hi for u in units)
