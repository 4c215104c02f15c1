"""Test setup: 8 simulated CPU devices and the persistent compilation cache, before jax is imported."""

import gc
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402

from doc2atom_jax import paths  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
paths.enable_compilation_cache()


@pytest.fixture(scope="session")
def smollm2():
  """The bundled SmolLM2-135M-Instruct (converted from its GGUF once, then cached on disk)."""
  from doc2atom_jax import models

  return models.load("smollm2-135m-instruct")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_functions():
  """Drops jax's in-memory caches after each test module. Every compiled CPU executable keeps its own memory
  mappings, and one pytest process compiles a few thousand functions: the whole suite in one process aborted
  inside XLA's compiler (a C++ abort, no Python error) once it neared the kernel's map limit (65,530 here),
  while each file alone passed. Recompiling across modules is cheap: the persistent cache holds them."""
  yield
  jax.clear_caches()
  gc.collect()
