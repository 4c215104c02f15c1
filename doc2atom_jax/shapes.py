"""Shape buckets: every padded size the project compiles for, in one place.

A jitted function compiles once per input shape, so every variable length (prompt, document, atoms, answers,
questions in a batch) is rounded up to a bucket before it reaches one; padding is always masked. The rules
differ by what varies how much, and each is named here once:
- `multiple(n, size)`: a multiple of `size`, at least `size` (document, span, answer and token axes);
- `pow2(n, floor)`: a power of two (batch rows, atom counts of an adapter);
- `length_bucket(n, floor)`: four buckets per octave (prompt lengths under evaluation and generation: at most
  25% padding for about four shapes per doubling);
- `atom_bucket(n, size)`: a power of two up to `size`, then multiples of it (training's atom axis);
- `ladder(n, first, growth)`: first, first·growth, ... (a bank's rows: routing compiles once per rung);
- `pad_up(batch, floor)`: a batch of arrays grown to a per-axis floor kept across steps.
"""

import numpy as np

MIN_PROMPT_BUCKET = 64  # the shortest padded prompt (`length_bucket`'s floor)


def multiple(n: int, size: int) -> int:
  """The smallest multiple of `size` >= n, and at least `size`."""
  return max(size, -(-int(n) // size) * size)


def pow2(n: int, floor: int = 1) -> int:
  """The smallest power of two >= max(n, floor): few shapes, so few compilations."""
  return max(floor, 1 << max(0, int(n) - 1).bit_length())


def length_bucket(n: int, floor: int = MIN_PROMPT_BUCKET) -> int:
  """A padded sequence length: four buckets per octave above `floor` (64, 80, 96, 112, 128, 160, ...), so at
  most 25% padding (compute) for about four compiled shapes per doubling of length."""
  if n <= floor:
    return floor
  step = 1 << max(0, (int(n) - 1).bit_length() - 3)
  return -(-int(n) // step) * step


def atom_bucket(n: int, size: int) -> int:
  """The atom axis: a power of two up to `size`, then multiples of it. d2l has one unit per document (or a
  few chunks), which padding to `size` made 8x as wide in the compiler, the factors and the composition."""
  return 1 << max(0, n - 1).bit_length() if n <= size else multiple(n, size)


def ladder(n: int, first: int = 64, growth: int = 4) -> int:
  """The smallest of first, first·growth, first·growth², ... that is >= n."""
  size = first
  while size < n:
    size *= growth
  return size


def pad_up(batch: dict, floor: dict) -> tuple[dict, dict]:
  """Zero-pads each array up to the per-axis maximum of its shape and `floor`; returns (batch, new floor).

  Every field's padding is masked (doc_mask, atom_mask, s_mask, q_mask, q_valid are False there), so a
  padded batch gives the same loss. A trainer that keeps the floor across steps compiles its step once per
  growth of some axis instead of once per combination of buckets.
  """
  out, new_floor = {}, {}
  for name, array in batch.items():
    shape = tuple(max(a, b) for a, b in zip(array.shape, floor.get(name, array.shape)))
    out[name] = np.pad(array, [(0, t - n) for t, n in zip(shape, array.shape)])
    new_floor[name] = shape
  return out, new_floor
