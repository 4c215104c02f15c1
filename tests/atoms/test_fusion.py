"""Answer-time routing and abstention (atoms/fusion.py): fusion finds the fact the dense score misses, abstention
reads the document, the null adapter is composed only for a refusal, calibration holds on held-out worlds."""

import numpy as np
import pytest

from doc2atom_jax.atoms import atomize, compose, fusion, lexical, router as router_lib

TEXT = ("Velkor Amsten was born in 1943. He works as an architect. Sunrenith was first settled in 1643. "
        "Sunrenith has 41,200 inhabitants. The Tarnow Institute was founded by Velkor Amsten.")


SENTENCES = [s + "." for s in TEXT.rstrip(".").split(". ")]
TYPES = ["temporal", "definition", "temporal", "quantity", "relation"]


def lexicon():
  atoms = [atomize.Atom("d", i, s, t, 0, 0, 0, 0) for i, (s, t) in enumerate(zip(SENTENCES, TYPES))]
  return fusion.Lexicon.of(atoms, [TEXT])


NORMALIZE = lambda top: router_lib.normalize(top, "softmax")


def dense(favour: int, n: int = 5, null: float = -5.0):
  scores = np.full((1, n + 1), 0.0, np.float32)
  scores[0, favour] = 3.0
  scores[0, -1] = null
  return scores


def test_fusion_finds_the_fact_the_dense_score_misses():
  lex = lexicon()
  question = "When was Sunrenith first settled?"
  order = fusion.fused_order(dense(favour=0)[0, :-1], question, lex)
  assert order[0] == 2  # temporal, names Sunrenith: ahead of the dense favourite (Velkor's birth year)
  indices, weights, refused = fusion.select(dense(favour=0), [question], lex, k=2, route_score="dense",
                                            abstain="evidence", margin=float("-inf"), normalize=NORMALIZE)
  assert indices[0, 0] == 0 and not refused[0]  # the router alone follows its score


def test_abstention_reads_the_document_and_composes_the_null_atom_only_to_refuse():
  lex = lexicon()
  questions = ["Who founded the Orlen Observatory?",  # a name the document never mentions
               "What is the population of Sunrenith?",  # answerable
               "How tall is Velkor Amsten?",  # nothing of its type about him: an unstated attribute
               "When was Sunrenith first settled?"]
  scores = np.repeat(dense(favour=3, null=-5.0), 4, axis=0)
  indices, weights, refused = fusion.select(scores, questions, lex, k=3, route_score="fused", abstain="evidence",
                                            margin=float("-inf"), normalize=NORMALIZE)
  assert refused.tolist() == [True, False, True, False]
  for row, r in zip(range(4), refused):
    if r:
      assert indices[row, 0] == compose.NULL_INDEX and weights[row].tolist() == [1.0, 0.0, 0.0]
    else:
      assert compose.NULL_INDEX not in indices[row].tolist()  # never mixed into an answer
      assert weights[row].sum() == pytest.approx(1.0)
  assert indices[1, 0] == 3 and indices[3, 0] == 2


def test_a_calibrated_margin_refuses_below_it():
  lex = lexicon()
  question = ["When was Sunrenith first settled?"]
  low = dense(favour=2, null=2.9)  # best atom 3.0, null 2.9: margin 0.1
  kw = dict(k=2, route_score="fused", abstain="evidence", normalize=NORMALIZE)
  assert fusion.select(low, question, lex, margin=0.5, **kw)[2].tolist() == [True]
  assert fusion.select(low, question, lex, margin=0.05, **kw)[2].tolist() == [False]
  assert fusion.margins(low).tolist() == pytest.approx([0.1])


def test_calibration_quantile_sets_the_false_refusal_rate():
  rng = np.random.default_rng(0)
  values = rng.normal(size=2000)
  t = fusion.calibrate_margin(values, 0.05)
  assert np.mean(values < t) == pytest.approx(0.05, abs=0.002)
  assert fusion.calibrate_margin([], 0.05) == fusion.calibrate_margin(values, 0.0) == float("-inf")  # lexical only


def test_calibration_worlds_are_never_the_heldout_ones():
  from configs import quickstart
  from doc2atom_jax.train import data as data_lib

  c = quickstart.get_config()
  heldout = {d.doc_id for d in data_lib.heldout_documents(c, 8)}
  calibration = {d.doc_id for d in data_lib.heldout_documents(c, 8, data_lib.CALIBRATION_START)}
  assert len(heldout) == len(calibration) == 8 and not heldout & calibration


def test_bad_routing_settings_are_refused():
  from doc2atom_jax.atoms import pipeline
  from doc2atom_jax.errors import UserError

  with pytest.raises(UserError, match="route_score"):
    pipeline.MethodConfig(route_score="bm25")
  with pytest.raises(UserError, match="abstain"):
    pipeline.MethodConfig(abstain="never")
  assert pipeline.MethodConfig(route_score="dense", abstain="null").v1_routing


def test_exports_carry_the_calibrated_margin_and_older_ones_still_load(tmp_path):
  """An export written before calibration existed (v1) loads and refuses by the lexical checks only; one with
  the calibration's metadata sets the margin."""
  from configs import tiny
  from doc2atom_jax import checkpoint
  from doc2atom_jax import system as system_lib

  c = tiny.get_config()
  system = system_lib.build_system(c)
  run = {"atoms": {"method": "doc2atom"}, "model": {"name": system.model.name}}
  checkpoint.export_params((system.compiler, system.router), tmp_path / "v1", {"run": run, "step": 1})
  checkpoint.export_params((system.compiler, system.router), tmp_path / "v2",
                           {"run": run, "step": 1, "abstention": {"margin": 0.25, "false_refusal": 0.02}})
  for name, margin in (("v1", float("-inf")), ("v2", 0.25)):
    c.unlock()
    c.params = str(tmp_path / name)
    assert system_lib.build_system(c, model=system.model).method.abstain_margin == margin
