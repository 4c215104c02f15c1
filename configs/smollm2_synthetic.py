"""The CPU experiment: the bundled SmolLM2-135M-Instruct on synthetic fact worlds, curriculum 4 -> 32 facts.

Run (one method per workdir; the same data, steps and learning rate for each, DESIGN §3):
  python -m doc2atom_jax.main --config=configs/smollm2_synthetic.py --workdir=runs/smollm2_synthetic/doc2atom
  python -m doc2atom_jax.main --config=configs/smollm2_synthetic.py:d2l --workdir=runs/smollm2_synthetic/d2l
  python -m doc2atom_jax.main --config=configs/smollm2_synthetic.py:d2l_atom \
      --workdir=runs/smollm2_synthetic/d2l_atom

Budget, 2-core CPU, one document x 8 questions a step. ESTIMATED, not measured: token counts from tokenizing
30 generated documents per stage with SmolLM2's tokenizer (13.6 tokens per fact; student prompt 33 + answer
5 tokens), padded as the batch pads them (64-token buckets), at DESIGN §12's ~100 tokens/s forward+backward
and ~300 tokens/s forward. Per step: 2 student passes (routed + oracle) x 8 x 64 tokens forward+backward
(10.2 s), the router's question pass 8 x 64 and the document pass forward, plus the teacher and evidence
teacher (8 prompts each, forward) the first time an example is seen; the teacher cache is keyed by model,
template and example, so the second and third methods get it from disk. d2l / d2l_atom skip the oracle pass
(about 5 s a step less). Jit compiles (about a minute per new document/atom bucket) are not included.

  | stage | steps   | facts | doc tokens (mean) | documents | questions | s/step | time    | s/step, teacher cached |
  |-------|---------|-------|-------------------|-----------|-----------|--------|---------|------------------------|
  | 1     | 0-149   | 4-8   | 77                | 150       | 1,200     | ~20    | ~51 min | ~12                    |
  | 2     | 150-299 | 8-16  | 156               | 150       | 1,200     | ~25    | ~62 min | ~12.5                  |
  | 3     | 300-449 | 16-32 | 310               | 150       | 1,200     | ~33    | ~84 min | ~13                    |
  | total | 450     |       |                   | 450       | 3,600     |        | ~3.3 h  | ~1.6 h (d2l: ~1 h)     |

Held-out evaluation: 8 validation-split documents of 4-32 facts (longer than most training documents).
"""

from configs import quickstart, variants

CURRICULUM = ((0, (4, 8)), (150, (8, 16)), (300, (16, 32)))


def get_config(arg: str | None = None):
  c = quickstart.get_config()
  c.unlock()
  c.mode = "train"
  c.model.name = "smollm2-135m-instruct"
  c.model.dtype = "float32"  # this CPU has no bf16 units
  c.train.steps = 450
  c.train.learning_rate = 1e-3  # the top of DESIGN §2.7's CPU sweep (3e-4 ... 1e-3)
  c.train.warmup_steps = 20
  c.train.checkpoint_every = 50
  c.data.source = "tfds"
  c.data.curriculum = CURRICULUM
  c.data.train_documents = 1000  # per stage; 150 are read a stage, the rest serve longer runs
  c.data.documents_per_step = 1
  c.data.questions_per_document = 8
  c.data.facts_per_document = (4, 32)  # held-out documents: every length of the curriculum
  c.eval.documents = 8
  variants.apply(c, arg)
  c.lock()
  return c
