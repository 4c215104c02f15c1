"""One process of a small multi-process job for tests/train/test_multiprocess.py (run as a script, not collected).

  python tests/train/multiprocess_worker.py <process_id> <num_processes> <port> <output.json>

Starts jax.distributed through `distributed.maybe_initialize` (gloo on CPU, 8 / num_processes devices each), then
feeds per-process batches whose shapes differ between processes through `agree_on_shapes` and `global_batch`
(one batch whose question rows the data axis splits, one it does not) and writes, from process 0, what the
global arrays hold, for the test to compare with the concatenated per-process batches.
"""

import json
import os
import sys

PROCESS_ID, NUM_PROCESSES, PORT, OUTPUT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // NUM_PROCESSES}"

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from doc2atom_jax import distributed, parallel  # noqa: E402

QUESTION_FIELDS = {"q_tokens", "doc_of_q"}


def local_batch(questions: int) -> dict:
  """Process p's batch: p + 1 tokens per document row (shapes differ between processes), values naming p."""
  p = jax.process_index()
  return {"doc_tokens": np.full((1, 8 * (p + 1)), p + 1, np.int32),
          "q_tokens": np.arange(questions * 4, dtype=np.int32).reshape(questions, 4) + 100 * p,
          "doc_of_q": np.zeros(questions, np.int32)}


def main():
  config = ml_collections.ConfigDict({"distributed": {
      "initialize": "on", "coordinator_address": f"127.0.0.1:{PORT}", "num_processes": NUM_PROCESSES,
      "process_id": PROCESS_ID, "local_device_ids": (), "timeout_s": 120}})
  assert distributed.maybe_initialize(config)
  mesh = parallel.make_mesh((-1, 1, 1))
  result = {"process_count": jax.process_count(), "device_count": jax.device_count(),
            "any_process": distributed.any_process(jax.process_index() == 1),
            "process_sum": distributed.process_sum(jax.process_index() + 1)}
  for questions in (3, 4):  # 3 x P rows: not split by the 8-way data axis (gathered); 4 x P: split in place
    batch, floor = distributed.agree_on_shapes(local_batch(questions), {})
    batch["doc_of_q"] = batch["doc_of_q"] + jax.process_index() * batch["doc_tokens"].shape[0]
    arrays, shardings = distributed.global_batch(
        batch, lambda shapes: parallel.batch_shardings(shapes, mesh, QUESTION_FIELDS))
    summed = jax.jit(lambda b: {k: v.sum() for k, v in b.items()})(arrays)
    result[str(questions)] = {
        "floor": {k: list(v) for k, v in floor.items()},
        "sharded": {k: not s.is_fully_replicated for k, s in shardings.items()},
        "values": {k: np.asarray(v).tolist() for k, v in distributed.host_local(arrays).items()},
        "sums": {k: int(v) for k, v in jax.device_get(summed).items()}}
  if distributed.is_main_process():
    with open(OUTPUT, "w", encoding="utf-8") as f:
      json.dump(result, f)


if __name__ == "__main__":
  main()
