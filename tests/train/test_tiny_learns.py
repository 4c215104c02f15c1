"""configs/tiny.py learns: a few dozen steps clearly lower the loss on held-out documents (fixed batches)."""

import jax
from flax import nnx

from configs import tiny
from doc2atom_jax import system as system_lib
from doc2atom_jax.train import batch as batch_lib
from doc2atom_jax.train import data as data_lib
from doc2atom_jax.train import step as step_lib
from doc2atom_jax.train import trainer

STEPS = 40


def heldout_losses(system, loss_cfg, batches):
  graphdef, params = nnx.split((system.compiler, system.router))
  fn = jax.jit(lambda p, b: step_lib.loss_fn(p, graphdef, system.model.weights, b, model_cfg=system.model.config,
                                             loss_cfg=loss_cfg)[1])
  rows = [jax.device_get(fn(params, b)) for b in batches]
  return {k: sum(float(r[k]) for r in rows) / len(rows) for k in ("loss", "ce", "route", "null")}


def test_tiny_config_loss_falls_within_a_few_dozen_steps(tmp_path):
  config = tiny.get_config()
  with config.unlocked():
    config.train.steps = STEPS
    config.train.checkpoint_every = STEPS
    config.data.source = "generator"
  system = system_lib.build_system(config)
  loss_cfg = step_lib.loss_config(config)
  heldout = [data_lib.to_train_document(d, system.model.tokenizer) for d in data_lib.heldout_documents(config, 6)]
  batches = [batch_lib.build(system.model, [d]) for d in heldout]
  before = heldout_losses(system, loss_cfg, batches)

  source = data_lib.source_from_config(config)
  tcfg = trainer.TrainConfig(**{**config.train.to_dict(), "mesh": tuple(config.train.mesh)})
  trainer.train(system, lambda s: source(s, system.model.tokenizer), tcfg, loss_cfg, tmp_path,
                run_meta={"test": "tiny learns"}, num_questions=config.data.questions_per_document)
  after = heldout_losses(system, loss_cfg, batches)
  print(f"\nheld-out before {before}\nheld-out after  {after}")
  assert after["loss"] < 0.85 * before["loss"], (before, after)  # measured: 20.45 -> 16.26 (-20%)
  # ce, not kd: a random model's teacher is almost never right, so kd (on the tokens it gets right) is ~0 here.
  assert after["ce"] < before["ce"] and after["null"] < before["null"], (before, after)
