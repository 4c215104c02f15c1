"""Answer-time routing and abstention (atoms/fusion.py): fusion finds the fact the dense score misses, abstention
reads the document, the null adapter is composed only for a refusal, calibration holds on held-out worlds."""

import jax.numpy as jnp
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
  with pytest.raises(UserError, match="second_hop"):
    pipeline.MethodConfig(second_hop="always")
  assert pipeline.MethodConfig(route_score="dense", abstain="null").v1_routing


def test_exports_carry_the_calibrated_margin_and_older_ones_still_load(tmp_path):
  """An export written before calibration existed (v1) loads and refuses by the lexical checks only; one with
  the calibration's metadata sets the margin."""
  from configs import tiny
  from doc2atom_jax import checkpoint
  from doc2atom_jax import system as system_lib

  c = tiny.get_config()
  system = system_lib.build_system(c)
  run = {"atoms": {"method": "doc2atom"}, "model": {"name": system.model.name}, "compiler": {"route_skip": True}}
  checkpoint.export_params((system.compiler, system.router), tmp_path / "v1", {"run": run, "step": 1})
  checkpoint.export_params((system.compiler, system.router), tmp_path / "v2",
                           {"run": run, "step": 1, "abstention": {"margin": 0.25, "false_refusal": 0.02}})
  for name, margin in (("v1", float("-inf")), ("v2", 0.25)):
    c.unlock()
    c.params = str(tmp_path / name)
    assert system_lib.build_system(c, model=system.model).method.abstain_margin == margin


def test_exports_from_before_the_routers_linear_path_still_load(tmp_path):
  """An export whose run config has no compiler.route_skip was trained with the keys' and queries' MLPs alone:
  it loads into a system built without the linear path, and routes as it did."""
  from configs import tiny
  from doc2atom_jax import checkpoint
  from doc2atom_jax import system as system_lib

  c = tiny.get_config()
  c.unlock()
  c.compiler.route_skip = False
  old = system_lib.build_system(c)
  assert not hasattr(old.compiler, "key_skip") and not hasattr(old.router, "q_skip")
  run = {"atoms": {"method": "doc2atom"}, "model": {"name": old.model.name}, "compiler": {"rank": 1}}
  checkpoint.export_params((old.compiler, old.router), tmp_path / "old", {"run": run, "step": 1})
  c.compiler.route_skip = True
  c.params = str(tmp_path / "old")
  loaded = system_lib.build_system(c, model=old.model)
  assert not loaded.cfg.route_skip
  np.testing.assert_array_equal(np.asarray(loaded.router.w2[...]), np.asarray(old.router.w2[...]))


def test_a_fresh_router_scores_the_centred_cosine():
  """With the linear path (the default), a fresh router's score is the cosine of the centred features through the
  one shared projection: the frozen model's own similarity, before any training."""
  from configs import tiny
  from doc2atom_jax import system as system_lib

  system = system_lib.build_system(tiny.get_config())
  rng = np.random.default_rng(0)
  atoms, questions = rng.normal(size=(5, system.cfg.hidden_size)), rng.normal(size=(3, system.cfg.hidden_size))
  system.compiler.key_center[...] = jnp.asarray(atoms.mean(0), jnp.float32)
  system.router.q_center[...] = jnp.asarray(questions.mean(0), jnp.float32)
  system.compiler.key_type[...] = jnp.zeros_like(system.compiler.key_type[...])  # types aside
  keys, _ = system.compiler.keys_from_pooled(jnp.asarray(atoms, jnp.float32), jnp.zeros(5, jnp.int32))
  queries = system.router.query_from_pooled(jnp.asarray(questions, jnp.float32))
  projection = np.asarray(system.compiler.key_skip[...])
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  expected = unit((questions - questions.mean(0)) @ projection) @ unit((atoms - atoms.mean(0)) @ projection).T
  np.testing.assert_allclose(np.asarray(queries @ keys.T), expected, atol=1e-4)


# A two-hop bank: the bridge (0) names Maria Delvane, whose birthplace (3) shares no name with the question;
# distractors share its words ("Tarnow Institute", "born", "founded").
HOP_FACTS = [("The Tarnow Institute was founded by Maria Delvane.", "relation"),
             ("The Tarnow Institute is based in Kodol.", "relation"),
             ("Velkor Amsten was born in Sunrenith.", "relation"),
             ("Maria Delvane was born in Kestrava.", "relation"),
             ("Oskar Brell was born in Lumen.", "relation"),
             ("The Tarnow Institute was founded in 1901.", "temporal"),
             ("Kodol has 41,200 inhabitants.", "quantity"),
             ("Maria Delvane won the Orlen Prize.", "event")]
TWO_HOP = "Where was the founder of the Tarnow Institute born?"


def hop_lexicon():
  atoms = [atomize.Atom("d", i, s, t, 0, 0, 0, 0) for i, (s, t) in enumerate(HOP_FACTS)]
  return fusion.Lexicon.of(atoms, [" ".join(s for s, _ in HOP_FACTS)])


def hop_scores(favour: int):
  """Dense scores [1, 9] (null last): one favoured atom, then two distractors born elsewhere."""
  scores = np.zeros((1, len(HOP_FACTS) + 1), np.float32)
  scores[0, 4], scores[0, 2], scores[0, favour], scores[0, -1] = 1.0, 2.0, 3.0, -5.0
  return scores


@pytest.mark.parametrize("favour", [i for i in range(len(HOP_FACTS)) if i != 3])  # 3: the router finds it alone
def test_the_second_hop_brings_the_answer_atom_into_the_top_k(favour):
  lex = hop_lexicon()
  kw = dict(k=3, route_score="fused", abstain="evidence", margin=float("-inf"), normalize=NORMALIZE)
  off, _, _ = fusion.select(hop_scores(favour), [TWO_HOP], lex, second_hop="off", **kw)
  on, weights, _ = fusion.select(hop_scores(favour), [TWO_HOP], lex, second_hop="names", **kw)
  assert 3 not in off[0]  # the first hop misses the answer: it shares no name with the question
  assert {0, 3} <= set(on[0].tolist()) and on[0, 0] == off[0, 0]  # bridge and answer in; the first atom stays
  assert weights[0].sum() == pytest.approx(1.0)


def test_off_is_the_first_hop_order_and_single_fact_questions_keep_their_first_atom():
  lex = hop_lexicon()
  dense = hop_scores(1)[0, :-1]
  first_hop = fusion.fused_order(dense, TWO_HOP, lex)
  np.testing.assert_array_equal(fusion.fused_order(dense, TWO_HOP, lex, "off"), first_hop)
  for question, gold in (("Where was Oskar Brell born?", 4), ("When was the Tarnow Institute founded?", 5),
                         ("How many inhabitants does Kodol have?", 6)):
    off = fusion.fused_order(dense, question, lex, "off")
    on = fusion.fused_order(dense, question, lex, "names")
    assert off[0] == on[0] == gold
    assert sorted(on.tolist()) == list(range(len(HOP_FACTS)))  # a reordering, nothing lost or repeated


def test_no_bridge_name_leaves_the_order_alone():
  lex = lexicon()  # the atoms that match the question add only numbers no other atom holds
  scores = dense(favour=1)[0, :-1]
  question = "When was Sunrenith first settled?"
  np.testing.assert_array_equal(fusion.fused_order(scores, question, lex, "names"),
                                fusion.fused_order(scores, question, lex, "off"))
  with pytest.raises(ValueError, match="second_hop"):
    fusion.fused_order(scores, question, lex, "twice")
