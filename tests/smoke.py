"""A quick end-to-end check on a fresh install (CI runs it under Python 3.12 with the newest jax).

Import, a tiny model of each family: forward with and without a zero adapter, KV-cache generation, and the
CLI's generate mode. Exits non-zero on any failure.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import flax
from doc2atom_jax import models
from doc2atom_jax.models import adapter as adapter_lib


def main() -> None:
  print(f"python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}")
  for family in ("llama", "qwen3", "gemma2", "gemma3"):
    model = models.load(f"tiny-random-{family}")
    ids = model.encode("smoke test 123")
    logits = model.logits(ids)
    zero = adapter_lib.zeros(model.config, 1, 2)
    assert np.array_equal(np.asarray(logits), np.asarray(model.logits(ids, adapter=zero))), family
    assert bool(jnp.isfinite(logits).all()), family
    answer = model.generate(["hello"], max_new_tokens=5)
    assert len(answer) == 1, family
    print(f"  {family}: logits {tuple(logits.shape)}, generated {answer[0]!r}")
  cli = [sys.executable, "-m", "doc2atom_jax.main", "--config=configs/quickstart.py",
         "--config.mode=generate", "--config.model.name=tiny-random-llama", "--config.generate.max_new_tokens=4"]
  result = subprocess.run(cli, capture_output=True, text=True, check=False)
  assert result.returncode == 0 and "A:" in result.stdout, result.stderr[-2000:]
  print("smoke ok")


if __name__ == "__main__":
  main()
