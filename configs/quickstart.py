"""The embedded default: the bundled SmolLM2-135M-Instruct answering a question about an invented document.

Run:
  python -m doc2atom_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
Override any field, e.g.:
  python -m doc2atom_jax.main --config=configs/quickstart.py --config.generate.question="When was it founded?"
  python -m doc2atom_jax.main --config=configs/quickstart.py --config.model.name=tiny-random-llama
"""

import ml_collections

DOCUMENT = (
    "The Orlen Observatory was founded in 1871 by the astronomer Maria Delvane. It stands on a basalt ridge "
    "above the fishing town of Kestrava. Its great refractor, nicknamed Old Lantern, has a lens 61 centimetres "
    "across. In 1904 the director Tomas Ebrel discovered a comet from the observatory."
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "generate"  # the only mode so far; train/eval/compile/ask/export arrive with their issues
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "smollm2-135m-instruct"  # or gemma3-270m, hf:<folder>, tiny-random-<family>
  c.model.dtype = "float32"  # compute dtype: float32 on CPU (no bf16 units), bfloat16 on accelerators
  c.model.scan_layers = False

  # mode=generate: the document and the question in the prompt (the `in_context` baseline).
  c.generate = ml_collections.ConfigDict()
  c.generate.document = DOCUMENT
  c.generate.document_file = ""  # a UTF-8 text file; replaces `document` when set
  c.generate.questions = ("Who founded the Orlen Observatory?", "In which year was the Orlen Observatory founded?",
                          "Above which town does the observatory stand?")
  c.generate.question = ""  # a single question; replaces `questions` when set
  c.generate.max_new_tokens = 24
  c.generate.temperature = 0.0  # 0 = greedy
  c.generate.top_p = 1.0
  c.generate.truncation = "error"  # or "left": keep the end of prompts that exceed the context

  c.lock()
  return c
