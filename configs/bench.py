"""The performance benchmark (issue 7; doc2atom_jax/bench.py): quickstart's model and atom system plus `bench`.

Run (full size, SmolLM2-135M; the compiler and router are untrained unless --config.params is given: timing
does not depend on training):
  python -m doc2atom_jax.bench --config=configs/bench.py --workdir=runs/bench
-> a table of ratios against the targets on stdout, runs/bench/bench/{bench.json, bench.png}.
The harness at a tiny size (the CI check; seconds, no meaningful timings):
  python -m doc2atom_jax.bench --config=configs/bench.py:tiny --config.bench.output=/tmp/bench_tiny
Override any field, e.g. --config.bench.repeats=5, --config.bench.lengths="(512, 2048)".
"""

import ml_collections

from configs import quickstart, tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size = arg or "full"
  if size not in ("full", "tiny"):
    from doc2atom_jax.errors import UserError  # pylint: disable=import-outside-toplevel

    raise UserError(f"unknown bench size {size!r}; valid: full, tiny (--config=configs/bench.py:tiny)")
  c = (tiny if size == "tiny" else quickstart).get_config()
  c.unlock()
  c.mode = "bench"  # also `python -m doc2atom_jax.main --config=configs/bench.py`
  b = c.bench = ml_collections.ConfigDict()
  b.output = ""  # default <workdir>/bench
  b.repeats = 3  # timed repetitions per figure after one untimed warm-up; the median and spread are kept
  b.long_from = 4096  # documents of this many tokens or more get long_repeats (each pass takes ~1 min on 2 cores)
  b.long_repeats = 2
  b.new_tokens = 16  # generated tokens per timed answer (stop tokens ignored)
  # Document tokens (synthetic test documents joined): 7600 is about the most SmolLM2's 8192 context holds with
  # a question and the answer (runner.QUESTION_RESERVE); a length that does not fit is an error.
  b.lengths = (512, 2048, 7600)
  b.kr = (8, 32)  # ranks of the composed adapter: k atoms x rank r (compiler.rank), plus the default adapter
  b.forward_tokens = 256  # tokens of the plain / composed forward
  # A batch of questions in a few adapter groups: gather form vs grouped (ragged_dot) form, k·r = forward_target's
  b.forward_batch, b.forward_groups, b.forward_batch_tokens = 8, 2, 64
  b.bank_sizes = (1_000, 10_000, 100_000, 1_000_000)  # synthetic unit keys (compiler.key_dim) per bank
  b.query_batches = (1, 8)
  b.route_k = 4  # top-k of the routing benchmark (atoms.k)
  b.route_blocks = 8  # blockwise top-k (router.top_k): as over a bank sharded on 8 devices
  b.route_approx = False  # jax.lax.approx_max_k per block (approximate on TPU only; exact on CPU and GPU)
  # Bank storage forms whose bytes are reported (code_dtype/key_dtype; int8 = absmax per atom and layer)
  b.storage_forms = ("bfloat16/float32", "int8/bfloat16")
  b.matmul_size = 2048  # the f32 matmul whose FLOP/s is the machine's ceiling
  b.scan_layers = True  # the base model's layers as a scan: faster compiles, the same numbers and speed
  # Targets (issue 7); a target whose length or k·r is not measured is reported as such.
  b.answer_targets = ((2048, 0.2), (7600, 0.05))  # doc2atom / in_context answer latency at these lengths
  b.forward_target = (8, 1.15)  # composed / plain forward at this k·r
  b.bytes_target = (2048, 0.05)  # atom-code bytes / KV-cache bytes at this length
  b.compile_target = 1.5  # compile a document / one forward pass over it, at every length
  b.routing_exponent_target = 1.0  # the growth exponent of routing time in bank size: below 1 = sublinear
  if size == "tiny":
    b.repeats = 1
    b.new_tokens = 4
    b.lengths = (32, 64)
    b.forward_tokens = 32
    b.forward_batch_tokens = 16
    b.bank_sizes = (1_000, 4_000)
    b.matmul_size = 128
    b.answer_targets = ((64, 0.2),)
    b.bytes_target = (64, 0.05)
  c.lock()
  return c
