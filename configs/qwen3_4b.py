"""Paper scale on Qwen3-4B-Instruct-2507: the Gemma-2-2B-it config (configs/gemma2_2b_it.py) on another base.

Replace the placeholder paths first (a local Hugging Face folder; Doc-to-LoRA's self-generated QA for this
base model). Run, one method per workdir (multi-host: the same command on every host):
  python -m doc2atom_jax.main --config=configs/qwen3_4b.py --workdir=runs/qwen3_4b/doc2atom \
      --config.model.name=hf:/data/models/Qwen3-4B-Instruct-2507 \
      --config.data.self_gen="('/data/self_gen_qa_d2l/qwen3',)"
  python -m doc2atom_jax.main --config=configs/qwen3_4b.py:d2l --workdir=runs/qwen3_4b/d2l
  python -m doc2atom_jax.main --config=configs/qwen3_4b.py:d2l_256 --workdir=runs/qwen3_4b/d2l_256
  python -m doc2atom_jax.main --config=configs/qwen3_4b.py:d2l_atom --workdir=runs/qwen3_4b/d2l_atom
Sharding: gemma2_2b_it's fsdp plan on its (-1, 8, 1) mesh; check a pod's per-chip memory first (shapes only):
  python -m doc2atom_jax.main --config=configs/qwen3_4b.py --config.mode=plan --config.plan.devices=256
"""

from configs import gemma2_2b_it

MODEL = "hf:/path/to/Qwen3-4B-Instruct-2507"
SELF_GEN = ("/path/to/self_gen_qa_d2l/Qwen3-4B-Instruct-2507",)


def get_config(arg: str | None = None):
  c = gemma2_2b_it.get_config(arg)  # trunk, rank, schedule, mesh, data and the method variant
  c.unlock()
  c.model.name = MODEL
  c.data.self_gen = SELF_GEN
  c.lock()
  return c
