"""The CPU experiment: the bundled SmolLM2-135M-Instruct on synthetic fact worlds, curriculum 4 -> 32 facts.
Its protocol, budget and hypotheses: docs/experiment.md (all of it: `python -m doc2atom_jax.experiment all`).

Run (one method per workdir; the same data, steps and learning rate for each, DESIGN §3):
  python -m doc2atom_jax.main --config=configs/smollm2_synthetic.py --workdir=runs/smollm2_synthetic/doc2atom
  python -m doc2atom_jax.main --config=configs/smollm2_synthetic.py:d2l --workdir=runs/smollm2_synthetic/d2l
  python -m doc2atom_jax.main --config=configs/smollm2_synthetic.py:d2l_256 \
      --workdir=runs/smollm2_synthetic/d2l_256
  python -m doc2atom_jax.main --config=configs/smollm2_synthetic.py:d2l_atom \
      --workdir=runs/smollm2_synthetic/d2l_atom

Budget, 2-core CPU, one document x 8 questions a step. Stage 1 is MEASURED (the quickstart: 4.9 s a step
while teacher outputs are computed, 2.6 s once they come from the teacher cache; 100 steps + setup +
evaluation = 10 min 47 s from a fresh cache). Stages 2-3 are EXTRAPOLATED: the student passes read the
question alone, so only the document pass and the teacher (8 document prompts + 8 evidence prompts, forward,
~600 tokens/s from the measured difference) grow with the document (mean 77 / 156 / 310 tokens per stage).
The teacher cache is keyed by model, template and example, so the second and third methods get it from disk;
d2l / d2l_atom skip the oracle pass. Jit compiles (~30 s per new shape; shapes only grow) are not included.

  | stage | steps   | facts | doc tokens (mean) | documents | s/step         | time     | s/step, teacher cached |
  |-------|---------|-------|-------------------|-----------|----------------|----------|------------------------|
  | 1     | 0-149   | 4-8   | 77                | 150       | 4.9 (measured) | ~12 min  | 2.6 (measured)         |
  | 2     | 150-299 | 8-16  | 156               | 150       | ~6.2           | ~16 min  | ~2.8                   |
  | 3     | 300-449 | 16-32 | 310               | 150       | ~8.5           | ~21 min  | ~3.1                   |
  | total | 450     |       |                   | 450       |                | ~50 min  | ~21 min                |

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
  # mode=eval (docs/experiment.md): the interference curve from 4 to 64 facts, 4 unseen worlds per size.
  c.eval.facts_per_document = (4, 8, 16, 32, 64)
  c.eval.synthetic_documents = 5  # the report's instrument gate needs >= 5 documents per cell
  c.eval.max_doc_tokens = 2048  # a 64-fact world is ~1,300 tokens
  c.eval.max_questions = 8  # per bundled QA dataset
  variants.apply(c, arg)
  c.lock()
  return c
