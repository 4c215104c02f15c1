"""A tiny random model: the whole training path in under two minutes on 2 CPU cores (tests, CI, debugging).

Run:
  python -m doc2atom_jax.main --config=configs/tiny.py --workdir=runs/tiny
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m doc2atom_jax.main --config=configs/tiny.py \
      --config.train.mesh="(2, 2, 2)" --workdir=runs/tiny8
The sharding plans (dp | fsdp | fsdp_tp) on such a mesh, and what each puts on one chip (shapes only):
  ... --config.sharding.plan=fsdp
  python -m doc2atom_jax.main --config=configs/tiny.py --config.mode=plan --config.plan.mesh="(2, 2, 2)"
"""

from configs import quickstart


def get_config(arg: str | None = None):
  c = quickstart.get_config(arg)
  c.unlock()
  c.mode = "train"
  c.model.name = "tiny-random-llama"
  c.compiler.code_dim = 32
  c.compiler.copy_dim = 8
  c.compiler.width = 32
  c.compiler.key_dim = 16
  c.compiler.num_blocks = 1
  c.compiler.num_heads = 2
  c.train.steps = 20
  c.train.warmup_steps = 2
  c.train.learning_rate = 3e-3
  c.train.schedule = "cosine"  # at 3e-3 on a tiny random model: the decay the tests' thresholds were set with
  c.train.checkpoint_every = 10
  c.train.eval_every = 10
  c.route_pretrain.steps = 20
  c.route_pretrain.documents = 8
  c.route_pretrain.facts_per_document = (3, 8)
  c.data.facts_per_document = (3, 5)
  c.data.questions_per_document = 4
  c.data.train_documents = 200
  c.eval.documents = 2
  c.eval.max_new_tokens = 4
  c.lock()
  return c
