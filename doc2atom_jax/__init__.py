"""doc2atom_jax: Doc-to-Atom in JAX/Flax.

Documents are split into typed knowledge atoms, each compiled into a micro-LoRA plus a retrieval key; a
router picks a few atoms per question and their adapters are composed into a frozen base decoder.
"""

__version__ = "0.1.0"
