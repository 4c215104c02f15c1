"""The trained methods as a config argument (`--config=configs/<name>.py:<variant>`): the rules live in the
package (`doc2atom_jax/variants.py`), so library code never imports this repository folder."""

from doc2atom_jax.variants import D2L_RANK, VARIANTS, alpha_for_rank, apply, set_rank  # noqa: F401
