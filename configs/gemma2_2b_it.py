"""Paper scale on Gemma-2-2B-it (TPU pods, GPU clusters): Doc-to-LoRA's trunk, data and schedule (DESIGN §13).

Replace the placeholder paths first: MODEL (a local Hugging Face folder with config.json, *.safetensors and
tokenizer.json) and SELF_GEN (Doc-to-LoRA's self-generated QA for this base model, `SakanaAI/self_gen_qa_d2l`,
or a `data.qa_files` glob over our own mode=selfgen shards). SQuAD / DROP / ROPES train splits come from
TFDS and the Hugging Face hub: the first run needs internet access (or prepared copies in their caches).

Run, one method per workdir (multi-host: the same command on every host):
  python -m doc2atom_jax.main --config=configs/gemma2_2b_it.py --workdir=runs/gemma2_2b_it/doc2atom \
      --config.model.name=hf:/data/models/gemma-2-2b-it --config.data.self_gen="('/data/self_gen_qa_d2l/gemma',)"
  python -m doc2atom_jax.main --config=configs/gemma2_2b_it.py:d2l --workdir=runs/gemma2_2b_it/d2l
  python -m doc2atom_jax.main --config=configs/gemma2_2b_it.py:d2l_256 --workdir=runs/gemma2_2b_it/d2l_256
  python -m doc2atom_jax.main --config=configs/gemma2_2b_it.py:d2l_atom --workdir=runs/gemma2_2b_it/d2l_atom

Memory per chip before renting any (shapes only, no weights needed; --config.sharding.plan=dp|fsdp|fsdp_tp):
  python -m doc2atom_jax.main --config=configs/gemma2_2b_it.py --config.mode=plan --config.plan.devices=256 \
      --config.plan.device_memory_gb=16

Not expressible in the config yet (set by hand or to come): the trunk's MLP x4 (CompilerConfig.mlp_ratio is
not a config field; it stays 2), the cosine schedule's minimum learning rate, Doc-to-LoRA's second phase
(20k steps on random 25-512-token chunks) and evaluation over the six QA benchmarks (EVAL_SOURCES; the
eval section only has the quick synthetic check).
"""

from configs import quickstart, variants

MODEL = "hf:/path/to/gemma-2-2b-it"
SELF_GEN = ("/path/to/self_gen_qa_d2l/gemma-2-2b-it",)
TRAIN_SOURCES = ("tfds:squad/v1.1@train", "tfds:drop@train", "hf:ropes@train")
# The paper's six (DESIGN §6), as qa.load_source names, for the evaluator when it takes QA sources.
EVAL_SOURCES = ("tfds:squad/v1.1", "tfds:drop", "hf:ropes", "longbench:qasper", "longbench:2wikimqa",
                "longbench:multifieldqa_en")
FSDP = 8  # parameters and optimizer state sharded 8 ways; the data axis takes the remaining devices


def get_config(arg: str | None = None):
  c = quickstart.get_config()
  c.unlock()
  c.mode = "train"
  c.model.name = MODEL
  c.model.dtype = "bfloat16"

  # Doc-to-LoRA's aggregator (DESIGN §13): 9 cross-attention blocks of width 512; codes of 512 (§10: r = 2,
  # c = 512 keeps a document's atoms under 5% of its KV cache on Gemma-2-2B).
  c.compiler.width = 512
  c.compiler.num_blocks = 9
  c.compiler.num_heads = 8
  c.compiler.code_dim = 512
  c.compiler.copy_dim = 128  # of d = 2304: the top directions of the embedding (quickstart copies all 576 of SmolLM2)
  c.compiler.key_dim = 256
  variants.set_rank(c, 2)

  # Doc-to-LoRA's optimizer and schedule: AdamW 4e-5, weight decay 0.01, warmup 100, 80k steps.
  c.train.steps = 80_000
  c.train.learning_rate = 4e-5
  c.train.warmup_steps = 100
  c.train.weight_decay = 0.01
  c.train.schedule = "cosine"
  c.train.checkpoint_every = 1000
  c.train.mesh = (-1, FSDP, 1)
  # fsdp, not the default fsdp_tp: with no tensor axis, fsdp_tp would leave the compiler's head maps (L x c x d_ff,
  # 490 MB in float32, x3 with Adam) whole on every chip; fsdp splits them 8 ways (mode=plan prints both).
  c.sharding.plan = "fsdp"
  c.loss.l1 = 0.1

  c.data.source = "qa"
  c.data.qa_files = TRAIN_SOURCES
  c.data.self_gen = SELF_GEN
  c.data.documents_per_step = 16  # x 8 questions = 128 a step: divisible by data x fsdp up to 128 devices
  c.data.questions_per_document = 8
  variants.apply(c, arg)
  c.lock()
  return c
