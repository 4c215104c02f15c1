"""The document-state cache: each training document's frozen layer states, computed once and stored on disk.

The end-to-end step's only pass over a document is frozen (the compiler reads the base model's states at every
layer's input over each atom's span; nothing is differentiated there). Runs that see the same documents again —
sweeps, ablations, final runs over one corpus — would recompute the same states every time; with the cache
(`config.train.state_cache`) the batch carries the span states (`doc_spans`) and the step skips the document pass.

Entries are keyed like the teacher cache: by model name, dtype and shape (the directory) and by the document's
token ids (the file), written atomically, recomputed when unreadable. Their size is layers x tokens x width in
the model's dtype: 30 x 200 x 576 float32 (SmolLM2-135M, a 200-token document) is 13.8 MB, so the cache is off
by default (the main job sees each document once) and meant for runs that revisit a bounded corpus.
"""

import hashlib
import json
import pathlib

import numpy as np

from doc2atom_jax import fileio, paths
from doc2atom_jax.atoms import encode

FORMAT = 1  # of the stored states; part of the directory key


class DocumentStateCache:
  """Frozen states [L, T, d] (the input of every layer) per (model, token ids); atomic writes."""

  def __init__(self, root, model):
    cfg = model.config
    identity = [FORMAT, model.name, cfg.dtype, cfg.num_layers, cfg.hidden_size]
    self.root = pathlib.Path(root) / hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]

  @classmethod
  def for_model(cls, model) -> "DocumentStateCache":
    """The project's shared cache for a model (under `paths.cache_root()`)."""
    return cls(paths.cache_root() / "document_states", model)

  def _path(self, token_ids) -> pathlib.Path:
    digest = hashlib.sha256(np.asarray(token_ids, np.int32).tobytes()).hexdigest()
    return self.root / digest[:2] / f"{digest}.npy"

  def get_or_compute(self, model, token_ids) -> np.ndarray:
    """The document's states [L, T, d]: read from disk, or one frozen pass (stored for the next run)."""
    path = self._path(token_ids)
    if path.exists():
      try:
        states = np.load(path)
        if states.shape[1] == len(token_ids):
          return states
      except (OSError, ValueError):
        pass  # unreadable entry: recompute it
    states = np.asarray(encode.document_states(model, token_ids))
    with fileio.atomic_open(path, "wb") as f:
      np.save(f, states)
    return states


def span_states(cache: DocumentStateCache, model, documents, N: int, S: int) -> np.ndarray:
  """The `doc_spans` batch field [D, N, S, L, d]: each atom's span states from the cache, zeros where padded
  (what the step's own document pass and `encode.gather_spans` give)."""
  cfg = model.config
  out = None
  for j, d in enumerate(documents):
    states = cache.get_or_compute(model, d.doc.token_ids)  # [L, T, d]
    if out is None:
      out = np.zeros((len(documents), N, S, cfg.num_layers, states.shape[-1]), states.dtype)
    for i, a in enumerate(d.doc.atoms):
      out[j, i, :a.token_end - a.token_start] = np.swapaxes(states[:, a.token_start:a.token_end], 0, 1)
  return out
