"""The base model's state statistics: what the compiler and router standardize their inputs with."""

import numpy as np
from flax import nnx

from doc2atom_jax.atoms import compiler as compiler_lib
from doc2atom_jax.atoms import encode
from doc2atom_jax.models import base


def test_calibration_statistics_standardize_the_calibration_states():
  model = base.tiny_random("llama")
  mean, scale = encode.calibration_statistics(model)
  L, d = model.config.num_layers, model.config.hidden_size
  assert mean.shape == scale.shape == (L, d) and np.all(scale > 0)
  comp = compiler_lib.AtomCompiler(compiler_lib.config_for(model.config, code_dim=16, width=16, key_dim=8,
                                                           num_blocks=1, num_heads=2), rngs=nnx.Rngs(0))
  states = encode.document_states(model, model.encode(encode.CALIBRATION_TEXT))  # [L, T, d]
  np.testing.assert_array_equal(np.asarray(comp.standardize(states)), np.asarray(states))  # identity until set
  comp.set_statistics(mean, scale)
  out = np.asarray(comp.standardize(states))[:, 1:]
  np.testing.assert_allclose(out.mean(axis=1), 0.0, atol=1e-3)
  assert np.all(out.std(axis=1) <= 1.0) and np.mean(out.std(axis=1)) > 0.8  # eps keeps flat features tame
  one = np.asarray(comp.standardize(states[3:4], (3,)))  # one layer by index, as the router's features
  np.testing.assert_allclose(one, np.asarray(comp.standardize(states))[3:4], rtol=1e-6)


def test_standardized_atoms_are_distinct_where_raw_ones_look_alike(smollm2):
  """SmolLM2's massive shared features make raw span means near-parallel; its statistics separate them."""
  from doc2atom_jax.atoms import atomize

  text = ("Velkor Amsten was born in 1943 in the fishing town of Kestrava. The Tarnow Institute was founded by "
          "Mira Oskel. The Orlen Lens weighs 12 kilograms. Daskel is a coastal city in Vorland.")
  doc = atomize.atomize(text, "d", smollm2.tokenizer)
  layer = smollm2.config.num_layers // 2
  states = np.asarray(encode.document_states(smollm2, doc.token_ids))[layer]
  mean, scale = encode.calibration_statistics(smollm2)
  spans = lambda x: np.stack([x[a.token_start:a.token_end].mean(0) for a in doc.atoms])
  cos = lambda v: (lambda u: (u @ u.T)[np.triu_indices(len(u), 1)].mean())(v / np.linalg.norm(v, axis=1)[:, None])
  raw, standardized = cos(spans(states)), cos(spans((states - mean[layer]) * scale[layer]))
  print(f"\nmean cosine between atoms at layer {layer}: raw {raw:.3f}, standardized {standardized:.3f}")
  assert raw > 0.7 and standardized < raw - 0.3
