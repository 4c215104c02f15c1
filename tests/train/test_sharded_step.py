"""The sharded train step on 8 simulated devices (mesh 2x2x2) equals the single-device step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from doc2atom_jax import parallel
from doc2atom_jax.atoms import compiler as compiler_lib
from doc2atom_jax.atoms import router as router_lib
from doc2atom_jax.errors import UserError
from doc2atom_jax.models import base
from doc2atom_jax.train import step as step_lib
from tests.train.test_step import tiny_batch

QUESTION_FIELDS = {"doc_of_q", "q_tokens", "q_mask", "s_tokens", "s_mask", "targets", "answer_mask", "teacher_ids",
                   "teacher_logp", "ev_teacher_ids", "ev_teacher_logp", "evidence", "labelled", "out_of_scope",
                   "q_valid"}


def test_sharded_step_equals_single_device():
  assert jax.device_count() == 8
  model = base.tiny_random("llama")
  cfg = compiler_lib.config_for(model.config, code_dim=32, width=32, key_dim=16, num_blocks=1, num_heads=2)
  rngs = nnx.Rngs(0)
  graphdef, params = nnx.split((compiler_lib.AtomCompiler(cfg, rngs=rngs), router_lib.Router(cfg, rngs=rngs)))
  batch = jax.tree.map(jnp.asarray, tiny_batch(model))  # 4 questions: the example axis splits over data x fsdp
  optimizer = step_lib.make_optimizer(1e-3, warmup_steps=1)
  static = dict(graphdef=graphdef, model_cfg=model.config, loss_cfg=step_lib.LossConfig(k=2), optimizer=optimizer)
  fn = lambda p, o, w, b: step_lib.train_step(p, o, w, b, **static)

  single = jax.jit(fn)(params, optimizer.init(params), model.weights, batch)

  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  p_sh = parallel.state_shardings(params, mesh)
  w_sh = parallel.module_weight_shardings(model.decoder, mesh)
  b_sh = parallel.batch_shardings(batch, mesh, QUESTION_FIELDS)
  s_params = jax.device_put(params, p_sh)
  s_opt, o_sh = parallel.on_mesh(jax.jit(optimizer.init)(s_params), mesh)
  s_weights = jax.device_put(model.weights, w_sh)
  s_batch = jax.device_put(batch, b_sh)
  step = jax.jit(fn, in_shardings=(p_sh, o_sh, w_sh, b_sh), out_shardings=(p_sh, o_sh, None))
  sharded = step(s_params, s_opt, s_weights, s_batch)

  np.testing.assert_allclose(float(sharded[2]["loss"]), float(single[2]["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(sharded[0]), jax.tree.leaves(single[0])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # Really sharded: non-trivial specs, and FSDP/tensor-sharded leaves hold a fraction of their bytes per device.
  specs = {str(s.spec) for s in jax.tree.leaves(p_sh) + jax.tree.leaves(w_sh)}
  assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)
  embed = s_weights["embed"]
  assert parallel.bytes_per_device(embed) * 4 == embed.size * embed.dtype.itemsize
  in_proj = jax.tree.leaves(sharded[0])[[i for i, s in enumerate(jax.tree.leaves(p_sh))
                                         if "fsdp" in str(s.spec)][0]]
  assert parallel.bytes_per_device(in_proj) < in_proj.size * in_proj.dtype.itemsize
  assert s_batch["s_tokens"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))


def test_impossible_mesh_is_a_clear_error():
  with pytest.raises(UserError, match="needs 12 devices; 8 are available"):
    parallel.make_mesh({"data": 3, "fsdp": 2, "tensor": 2})
  assert parallel.make_mesh({"data": -1, "fsdp": 2, "tensor": 2}).shape["data"] == 2
