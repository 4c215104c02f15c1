"""The CPU experiment: the bundled SmolLM2-135M-Instruct on synthetic fact worlds, curriculum 4 -> 32 facts.
Its protocol, budget and hypotheses: docs/experiment.md (all of it: `python -m doc2atom_jax.experiment all`).

Run (one method per workdir; the same data, steps and learning rate for each, DESIGN §3):
  python -m doc2atom_jax.main --config=configs/smollm2_synthetic.py --workdir=runs/smollm2_synthetic/doc2atom
  python -m doc2atom_jax.main --config=configs/smollm2_synthetic.py:d2l --workdir=runs/smollm2_synthetic/d2l
  python -m doc2atom_jax.main --config=configs/smollm2_synthetic.py:d2l_256 \
      --workdir=runs/smollm2_synthetic/d2l_256
  python -m doc2atom_jax.main --config=configs/smollm2_synthetic.py:d2l_atom \
      --workdir=runs/smollm2_synthetic/d2l_atom

Protocol, budget and hypotheses: docs/experiment.md, v2 (the v1 config is at git 00a03b9). 1,000 steps of one
document x 8 questions (1,000 training documents), curriculum 4-8 / 8-16 / 16-32 facts, method v2's recipe with
a constant rate after warmup (set here, not inherited). Step times measured on this machine: 5.0 s at 4-8 facts
with the teacher computed (the quickstart), v1's d2l 3.0 s; the whole experiment is estimated at ~10 CPU-hours.
Held-out evaluation during training: 8 validation-split documents of 4-32 facts every 50 steps.
"""

from configs import quickstart, variants

CURRICULUM = ((0, (4, 8)), (333, (8, 16)), (666, (16, 32)))


def get_config(arg: str | None = None):
  c = quickstart.get_config()
  c.unlock()
  c.mode = "train"
  c.model.name = "smollm2-135m-instruct"
  c.model.dtype = "float32"  # this CPU has no bf16 units
  c.train.steps = 1000
  c.train.learning_rate = 1e-3  # the sweep (docs/experiment.md) selects each method's rate
  c.train.warmup_steps = 20
  c.train.schedule = "constant"  # explicit: measured above cosine at 100 steps (docs/method.md §6), every method
  c.train.checkpoint_every = 50
  c.train.eval_every = 50
  c.train.state_cache = False  # no step time saved on this machine (docs/method.md §6); ~12 GB for 1,000 documents
  c.data.source = "tfds"
  c.data.curriculum = CURRICULUM
  c.data.train_documents = 1000  # per stage; 334 are read a stage
  c.data.documents_per_step = 1
  c.data.questions_per_document = 8
  c.data.facts_per_document = (4, 32)  # held-out documents: every length of the curriculum
  c.eval.documents = 8
  # mode=eval (docs/experiment.md v2): the interference curve from 4 to 64 facts, 50 unseen worlds a size.
  c.eval.facts_per_document = (4, 8, 16, 32, 64)
  c.eval.synthetic_documents = 50
  c.eval.max_doc_tokens = 2048  # a 64-fact world is ~1,300 tokens
  c.eval.max_questions = 40  # per bundled QA dataset (v1: 8)
  variants.apply(c, arg)
  c.lock()
  return c
