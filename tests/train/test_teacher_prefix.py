"""The teacher's shared-prefix path (a document's prefix encoded once, each question's suffix against its KV
cache) gives the packed path's top-K: the same ids, log-probs to 1e-4 (float32; the paths differ only in the
order of float sums). Every tiny family: llama/mistral/qwen2 (plain, qwen2 with q/k/v biases), qwen3 (q/k norms,
untied head), gemma2 (sliding window of 6 across the prefix's padding hole, attention and final softcaps),
gemma3 (sliding and full layers with their own rotary bases)."""

import jax
import numpy as np
import pytest

from doc2atom_jax.data import prompts as prompts_lib
from doc2atom_jax.data import synthetic
from doc2atom_jax.models import base, tiny
from doc2atom_jax.train import teacher

ATOL = 1e-4
DOCUMENT = ("The Varnholt observatory was founded in 1901 by Ada Orlen on the northern ridge above Kessa. "
            "Its first telescope came from Lindqvist of Malmo; its library holds the letters of Orlen's pupils.")
QUESTIONS = [("When was the observatory founded?", "It was founded in", "1901"),
             ("Who founded it?", "It was founded by", "Ada Orlen"),
             ("Where is it?", "It is on", "the northern ridge above Kessa"),
             ("Where did the first telescope come from?", "It came from", "Lindqvist of Malmo"),
             ("What does the library hold?", "It holds", "letters"),
             ("Which town lies below the ridge, according to the description of the site?", "The town is", "Kessa"),
             ("Whose pupils wrote letters?", "They were", "Orlen's pupils"),
             ("Name?", "It is the", "Varnholt observatory")]

OTHER_DOCUMENT = ("In 1887 Ida Varn built a mill on the river Tolle, where the old ferry had crossed; the mill ground "
                  "rye for Kessa until 1932 and now houses a school of music.")


def rows(model, document=DOCUMENT, questions=QUESTIONS):
  turns = [prompts_lib.in_context_prompt(document, q) for q, _, _ in questions]
  return model.prompt_answer_ids(turns, [a for _, _, a in questions], [p for _, p, _ in questions])


def boundary_rows(model):
  """The 8 rows, one of which changes the document's last two tokens (as a question that tokenizes into the
  boundary does): the group's shared prefix is shorter than the others' common prefix."""
  prompts, answers = rows(model)
  shared = min(teacher.generate_lib.common_prefix(prompts[0], p) for p in prompts[1:])
  changed = [(t + 1) % 250 + 3 for t in prompts[5][shared - 2:shared]]
  prompts[5] = prompts[5][:shared - 2] + changed + prompts[5][shared:]
  return prompts, answers


def assert_same(got, want):
  assert len(got) == len(want)
  for (ids_g, logp_g), (ids_w, logp_w) in zip(got, want):
    assert ids_g.shape == ids_w.shape and logp_g.dtype == np.float32
    np.testing.assert_array_equal(ids_g, ids_w)
    np.testing.assert_allclose(logp_g, logp_w, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_shared_prefix_equals_packed(family):
  model = base.tiny_random(family)
  prompts, answers = boundary_rows(model)
  assert len({len(p) for p in prompts}) > 1 and len({len(a) for a in answers}) > 1
  before = teacher.PATH_RUNS.copy()
  packed = teacher.topk_on_answers(model, prompts, answers, min_shared_prefix=None)
  shared = teacher.topk_on_answers(model, prompts, answers)
  runs = teacher.PATH_RUNS - before
  assert runs == {"packed": 1, "shared_prefix": 1}
  assert_same(shared, packed)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_shared_prefix_by_vocabulary_chunks(family):
  model = base.tiny_random(family)
  prompts, answers = boundary_rows(model)
  packed = teacher.topk_on_answers(model, prompts, answers, min_shared_prefix=None)
  before = teacher.PATH_RUNS.copy()
  chunked = teacher.topk_on_answers(model, prompts, answers, vocab_chunk=48)
  assert teacher.PATH_RUNS - before == {"shared_prefix": 1}
  assert_same(chunked, packed)


def test_rows_of_several_documents_group_by_prefix():
  """Two documents' questions interleaved, and a row sharing only the chat header: a shared-prefix pass per
  document, the odd row packed; results in the rows' order."""
  model = base.tiny_random("gemma2")
  p1, a1 = rows(model, questions=QUESTIONS[:4])
  p2, a2 = rows(model, OTHER_DOCUMENT, QUESTIONS[4:])
  p3, a3 = rows(model, "Short.", QUESTIONS[:1])
  prompts = [p1[0], p2[0], p1[1], p3[0], p2[1], p1[2], p2[2], p1[3], p2[3]]
  answers = [a1[0], a2[0], a1[1], a3[0], a2[1], a1[2], a2[2], a1[3], a2[3]]
  groups = teacher.prefix_groups(prompts, teacher.MIN_SHARED_PREFIX)
  assert [g for g, _ in groups] == [[0, 2, 5, 7], [1, 4, 6, 8], [3]]
  packed = teacher.topk_on_answers(model, prompts, answers, min_shared_prefix=None)
  before = teacher.PATH_RUNS.copy()
  got = teacher.topk_on_answers(model, prompts, answers)
  assert teacher.PATH_RUNS - before == {"shared_prefix": 2, "packed": 1}
  assert_same(got, packed)


def test_short_prefix_or_one_row_stays_packed():
  model = base.tiny_random("llama")
  prompts, answers = rows(model, "Short document.")  # the chat header and two words: < 64 shared tokens
  assert min(teacher.generate_lib.common_prefix(prompts[0], p) for p in prompts) < teacher.MIN_SHARED_PREFIX
  long_prompts, long_answers = rows(model)
  for args in ((prompts, answers), (long_prompts[:1], long_answers[:1])):
    before = teacher.PATH_RUNS.copy()
    teacher.topk_on_answers(model, *args)
    assert teacher.PATH_RUNS - before == {"packed": 1}


def test_identical_prompts_keep_an_answer_position_in_the_suffix():
  """Rows with the same prompt (one question, several answers): the shared prefix stops before the prompt's
  last token, whose hidden state predicts the first answer token."""
  model = base.tiny_random("qwen2")
  prompts, answers = rows(model, questions=[QUESTIONS[0]] * 3)
  answers = [answers[0], answers[0][:1], answers[0] + [ord("!")]]
  [(rows_, shared)] = teacher.prefix_groups(prompts, teacher.MIN_SHARED_PREFIX)
  assert shared == len(prompts[0]) - 1
  assert_same(teacher.topk_on_answers(model, prompts, answers),
              teacher.topk_on_answers(model, prompts, answers, min_shared_prefix=None))


def test_cache_entries_agree_across_paths(tmp_path):
  """An entry computed on one path is what the other computes (keys do not name the path)."""
  model = base.tiny_random("llama")
  prompts, answers = rows(model)
  keys = [str(i) for i in range(len(prompts))]
  cache = teacher.TeacherCache(tmp_path, model.name, "t")
  cached = cache.get_or_compute(model, keys, prompts, answers)
  assert_same(cached, teacher.topk_on_answers(model, prompts, answers, min_shared_prefix=None))


def test_smollm2_on_a_real_document(smollm2):
  """SmolLM2-135M, a ~300-token synthetic document and its 8 questions, built as `train/batch.py` builds the
  teacher's rows."""
  doc = synthetic.document("test", 0, seed=0, facts_per_document=(24, 24), questions_per_document=8,
                              paraphrase=2)
  prompts, answers = smollm2.prompt_answer_ids(
      [prompts_lib.in_context_prompt(doc.text, q.question) for q in doc.questions],
      [q.answer for q in doc.questions], [q.answer_prefix for q in doc.questions])
  shared = min(teacher.generate_lib.common_prefix(prompts[0], p) for p in prompts[1:])
  assert 300 < shared < 400
  packed = teacher.topk_on_answers(smollm2, prompts, answers, min_shared_prefix=None)
  before = teacher.PATH_RUNS.copy()
  got = teacher.topk_on_answers(smollm2, prompts, answers)
  assert teacher.PATH_RUNS - before == {"shared_prefix": 1}
  for (ids_g, logp_g), (ids_w, logp_w) in zip(got, packed):
    # exact ties among the tail of a real model's top-16 could swap ids: compare the ids whose log-probs
    # are apart from their neighbours', and every value
    np.testing.assert_allclose(logp_g, logp_w, atol=ATOL, rtol=0)
    apart = np.abs(np.diff(logp_w, axis=-1)) > 2 * ATOL
    distinct = np.concatenate([apart[:, :1], apart[:, 1:] & apart[:, :-1], apart[:, -1:]], axis=-1)
    np.testing.assert_array_equal(ids_g[distinct], ids_w[distinct])
  jax.clear_caches()
