"""The trained methods of DESIGN §3 as a config argument: `--config=configs/<name>.py:<variant>` (configs/variants.py
re-exports this module for the config files).

Every trained config ends with `apply(c, arg)`, so `:doc2atom` (the default), `:d2l`, `:d2l_256` and `:d2l_atom` change
only what distinguishes the methods and everything else (data, steps, learning rate) stays equal. The
trainer drops the route, atom and null loss terms for the methods without a router (modes.train).
"""

from doc2atom_jax.errors import UserError

VARIANTS = ("doc2atom", "d2l", "d2l_256", "d2l_atom")  # d2l_256: d2l with one adapter per 256-token chunk
D2L_RANK = 8  # Doc-to-LoRA's rank per document (or chunk), DESIGN §13


def alpha_for_rank(rank: int) -> float:
  """Doc-to-LoRA's fixed adapter scale r^1.5 · 2 (DESIGN §13); 2.0 at the CPU configs' rank 1."""
  return 2.0 * rank**1.5


def set_rank(c, rank: int) -> None:
  """The micro rank of every atom (or of a d2l adapter) with its matching scale."""
  c.compiler.rank = rank
  c.compiler.alpha = alpha_for_rank(rank)


def apply(c, arg: str | None):
  """Switches `c` (unlocked) to the method named by the config argument; returns it."""
  variant = arg or "doc2atom"
  if variant not in VARIANTS:
    raise UserError(f"unknown config variant {variant!r}; valid: {', '.join(VARIANTS)} (--config=<file>.py:<variant>)")
  c.atoms.method = "d2l" if variant == "d2l_256" else variant
  if c.atoms.method == "d2l":
    set_rank(c, D2L_RANK)
    c.atoms.chunk_tokens = 256 if variant == "d2l_256" else 0
  return c
