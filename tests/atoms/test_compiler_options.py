"""Compiler and optimizer options the ablations compare: one shared head, the learning-rate schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from doc2atom_jax.atoms import compiler as compiler_lib
from doc2atom_jax.errors import UserError
from doc2atom_jax.models import base
from doc2atom_jax.train import step as step_lib


def test_a_shared_head_is_one_map_for_every_layer():
  cfg = base.tiny_random("llama").config
  make = lambda shared: compiler_lib.AtomCompiler(compiler_lib.config_for(
      cfg, code_dim=32, width=32, key_dim=16, num_blocks=1, num_heads=2, copy_dim=8, shared_head=shared),
      rngs=nnx.Rngs(0))
  shared, per_layer = make(True), make(False)
  assert shared.head_a[0].shape[0] == 1 and per_layer.head_a[0].shape[0] == cfg.num_layers
  shared.head_b[0][...] = jnp.ones_like(shared.head_b[0][...])
  shared.copy_gain[...] = jnp.arange(cfg.num_layers, dtype=jnp.float32)[:, None]
  head = shared.head()
  a, b = np.asarray(head["a"][0]), np.asarray(head["b"][0])
  assert a.shape[0] == b.shape[0] == cfg.num_layers
  np.testing.assert_array_equal(a[0], a[-1])  # the same A map at every layer ...
  assert not np.allclose(b[0], b[-1])  # ... while the copy path's per-layer gains still differ
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(per_layer) - count(shared) == (cfg.num_layers - 1) * 32 * sum(i + o for i, o in
                                                                            shared.cfg.target_dims)


@pytest.mark.parametrize("schedule,last_over_mid", [("constant", (0.99, 1.01)), ("cosine", (0.05, 0.3))])
def test_learning_rate_schedules(schedule, last_over_mid):
  """A constant gradient under Adam moves a parameter by about the learning rate a step: the step size late
  in the run over the one just after warmup is 1 for a constant schedule, about 10-20% for cosine decay."""
  opt = step_lib.make_optimizer(1e-2, warmup_steps=5, total_steps=100, weight_decay=0.0, clip_norm=1e9,
                                schedule=schedule)
  params = {"x": jnp.zeros(())}
  state = opt.init(params)
  sizes = []
  for _ in range(100):
    updates, state = opt.update({"x": jnp.ones(())}, state, params)
    sizes.append(abs(float(updates["x"])))
  ratio = sizes[-1] / sizes[6]
  assert last_over_mid[0] <= ratio <= last_over_mid[1], ratio
  with pytest.raises(UserError, match="unknown train.schedule"):
    step_lib.make_optimizer(schedule="linear")
