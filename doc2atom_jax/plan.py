"""Mode `plan`: what one chip holds when this config trains under its sharding plan, before renting any chip.

Everything comes from shapes: the base model's layout (`decoder.param_specs`) from its config.json, or from
a small built-in table when the weights are not here yet (`KNOWN_SHAPES`); the compiler, router and AdamW
state from `nnx.eval_shape` / `jax.eval_shape`; each array's per-chip shard from the plan's PartitionSpec and
the mesh axis sizes, by arithmetic. No mesh is built and nothing is allocated, so a 256-chip plan runs on a
laptop in seconds. Parameters and optimizer state are exact (tests/test_plan.py checks them, and the step's
argument bytes, against a real sharded compile on 8 simulated devices); activations are an estimate (formula
in `activation_bytes`; 1.2-1.5x over XLA's temp bytes on CPU for the tiny model, the test allows 2x).
Why a planner: whether a plan fits is a question of bytes per chip, and asking it of a pod costs a pod.
The estimate counts what the trainer does today: documents (and so the compiler's per-atom work) are whole
on every chip, only question rows split; at paper scale that part dominates.

Run:
  python -m doc2atom_jax.main --config=configs/gemma2_2b_it.py --config.mode=plan --config.plan.devices=256
  python -m doc2atom_jax.main --config=configs/tiny.py --config.mode=plan --config.plan.mesh="(2, 2, 2)"
"""

import dataclasses
import json
import math
import pathlib

import jax
import numpy as np
from flax import nnx

from doc2atom_jax import errors, parallel, paths
from doc2atom_jax.errors import UserError
from doc2atom_jax.models import config as config_lib
from doc2atom_jax.models import decoder as decoder_lib

# transformers configs of models one plans for before downloading them (only shapes matter here). Matched
# against the model name's last path component, so `hf:/path/to/gemma-2-2b-it` plans without the folder.
KNOWN_SHAPES = {
    "gemma-2-2b": ("gemma2", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                  max_position_embeddings=8192, sliding_window=4096, query_pre_attn_scalar=256,
                                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                  hidden_activation="gelu_pytorch_tanh")),
    "qwen3-4b": ("qwen3", dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                               max_position_embeddings=262144, tie_word_embeddings=True)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                   max_position_embeddings=8192, tie_word_embeddings=True)),
    "gemma3-270m": ("gemma3_text", dict(vocab_size=262144, hidden_size=640, intermediate_size=2048,
                                        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                                        head_dim=256, max_position_embeddings=32768, sliding_window=512,
                                        query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh")),
}
KNOWN_SHAPES["gemma-3-270m"] = KNOWN_SHAPES["gemma3-270m"]
GiB = 1024 ** 3


def decoder_config(name: str, dtype: str = "float32") -> tuple[config_lib.DecoderConfig, str]:
  """(the DecoderConfig of model `name`, where its shapes came from), without reading any weights."""
  import transformers

  from doc2atom_jax.models import base, tiny

  if name.startswith("tiny-random-") and name[len("tiny-random-"):] in tiny.FAMILIES:
    return config_lib.from_hf_config(tiny.hf_config(name[len("tiny-random-"):]), dtype=dtype), "built in"
  folder = pathlib.Path(name[3:]).expanduser() if name.startswith("hf:") else (
      paths.model_cache_dir() / name if name in base.BUNDLED else None)
  if folder is not None and (folder / "config.json").is_file():
    try:
      hf = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
      raise UserError(f"{folder}/config.json cannot be read: {e}") from None
    return config_lib.from_hf_config(hf, dtype=dtype), str(folder / "config.json")
  stem = (name[3:] if name.startswith("hf:") else name).rstrip("/").rsplit("/", 1)[-1].lower()
  for key, (model_type, fields) in KNOWN_SHAPES.items():
    if key in stem:
      hf = transformers.AutoConfig.for_model(model_type, **fields)
      return config_lib.from_hf_config(hf, dtype=dtype), f"built-in shapes of {key}"
  raise UserError(f"no shapes for model {name!r}: give an hf:<folder> with a config.json, or one of the built-in "
                  f"shapes ({', '.join(KNOWN_SHAPES)}) or {', '.join(base.valid_names())}")


def compiler_config(config, model_cfg):
  """The CompilerConfig of a run config: every `config.compiler` field the dataclass knows (as build_system)."""
  from doc2atom_jax.atoms import compiler as compiler_lib

  known = {f.name for f in dataclasses.fields(compiler_lib.CompilerConfig)}
  fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.compiler.items() if k in known}
  try:
    return compiler_lib.config_for(model_cfg, **fields)
  except ValueError as e:
    raise UserError(f"bad compiler config: {e}") from None


def abstract_trainable(compiler_cfg):
  """(nnx.State of ShapeDtypeStructs, matching nnx.State of logical PartitionSpecs) of (compiler, router)."""
  from doc2atom_jax.atoms import compiler as compiler_lib
  from doc2atom_jax.atoms import router as router_lib

  def make():
    rngs = nnx.Rngs(0)
    return compiler_lib.AtomCompiler(compiler_cfg, rngs=rngs), router_lib.Router(compiler_cfg, rngs=rngs)

  _, state = nnx.split(nnx.eval_shape(make))
  return state, nnx.get_partition_spec(state)


def _shard(shape, dtype, logical, mesh, rules) -> jax.ShapeDtypeStruct:
  """One chip's piece of an array with these logical axes under the rules."""
  spec = parallel.spec_for(shape, logical, mesh, rules)
  return jax.ShapeDtypeStruct(parallel.shard_shape(shape, spec, mesh), dtype)


def _nbytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def base_weight_shards(model_cfg, mesh, rules) -> dict:
  """Per-chip ShapeDtypeStructs of the frozen base weights (the trainer's `module_weight_shardings`)."""
  dtype = np.dtype(model_cfg.param_dtype)
  specs = decoder_lib.param_specs(model_cfg)
  return jax.tree.map(lambda s: _shard(s[0], dtype, s[1], mesh, rules), specs, is_leaf=decoder_lib._is_spec)


def trainable_shards(state, logical, mesh, rules):
  """Per-chip ShapeDtypeStructs of (compiler, router) params (the trainer's `state_shardings`)."""
  return jax.tree.map(lambda x, axes: _shard(x.shape, x.dtype, tuple(axes), mesh, rules), state, logical)


def optimizer_shards(config, local_params):
  """Per-chip optimizer state: the optimizer initialized on each chip's parameter shards. jit gives the
  moments their parameter's sharding and keeps the step counts whole, so this is exactly a chip's share."""
  from doc2atom_jax.train import step as step_lib

  t = config.train
  optimizer = step_lib.make_optimizer(t.learning_rate, t.warmup_steps, t.steps, t.weight_decay, t.clip_norm,
                                      t.accumulate)
  return jax.eval_shape(optimizer.init, local_params)


@dataclasses.dataclass(frozen=True)
class StepShape:
  """The sizes one training step's activations depend on (the batch builder's D, N, S, T, B, Tq, Ts, A)."""
  documents: int  # D
  atoms: int  # N per document
  span_tokens: int  # S
  doc_tokens: int  # T
  questions: int  # B (all documents; padded to the batch shards)
  question_tokens: int  # Tq
  student_tokens: int  # Ts
  answer_tokens: int  # A


def activation_bytes(model_cfg, compiler_cfg, shape: StepShape, *, batch_shards: int, tensor_shards: int = 1,
                     student_passes: int = 2) -> dict:
  """Estimated bytes one chip holds for one training step's activations, by part.

  e = bytes of the compute dtype; compiler and adapter math is float32 (4 bytes). Document-side tensors are
  whole on every chip (the trainer splits only the question axis); question-side ones are divided by the
  batch shards b; the base model's per-head and MLP tensors by the tensor shards t.
    documents   (L+1)·D·T·d·e                         every layer's input states (the compiler reads them all)
    compiler    L·D·N·S·(2d + 4w)·4 + L·D·N·n_b·(2·h·Q·S + (6 + 2m)·Q·w)·4 + 2·D·N·L·r·n_t·(d_in + d_out)·4
                span states and their context projection; per block keys, values, scores and probabilities;
                materialized atom factors (l1/orth losses); Q = n_t·r latent queries, m = mlp ratio, h heads
    questions   (L+1)·B·Tq·d·e / b                    the router's frozen question pass
    student     p·L·B·Ts·[(4d + 2(q + kv) + 3f)·e/t + 2·H·Ts·4/t] / b
                per student pass (p = 2 with the oracle pass) and layer, what backward keeps: norms and
                residuals, q/k/v/o, gate/up/activation, float32 attention scores and probabilities
    adapters    2p·B·(N+1)·L·r·n_t·(d_in + d_out)·4 / b   each question composes every atom of its document
    logits      3p·B·A·V·4 / b                        answer-position logits, log-softmax and their gradient
  """
  c, k = model_cfg, compiler_cfg
  e = np.dtype(c.dtype).itemsize
  L, d, f, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  D, N, S, T = shape.documents, shape.atoms, shape.span_tokens, shape.doc_tokens
  B, Tq, Ts, A = shape.questions, shape.question_tokens, shape.student_tokens, shape.answer_tokens
  w, nb, h, m, r, nt = k.width, k.num_blocks, k.num_heads, k.mlp_ratio, k.rank, k.num_targets
  Q = nt * r
  io = sum(di + do for di, do in k.target_dims)  # over targets: sum of d_in + d_out
  b, t, p = batch_shards, tensor_shards, student_passes
  parts = {
      "documents": (L + 1) * D * T * d * e,
      "compiler": (L * D * N * S * (2 * d + 4 * w) * 4 + L * D * N * nb * (2 * h * Q * S + (6 + 2 * m) * Q * w) * 4
                   + 2 * D * N * L * r * io * 4),
      "questions": (L + 1) * B * Tq * d * e / b,
      "student": p * L * B * Ts * ((4 * d + 2 * (q + kv) + 3 * f) * e / t + 2 * c.num_heads * Ts * 4 / t) / b,
      "adapters": 2 * p * B * (N + 1) * L * r * io * 4 / b,
      "logits": 3 * p * B * A * V * 4 / b,
  }
  return {name: int(v) for name, v in parts.items()}


def _tensor_shards(mesh, rules) -> int:
  """Tensor-parallel degree of the base model's MLP under the rules (1 when `mlp` is not sharded)."""
  axes = dict(rules).get("mlp")
  return parallel._mesh_size(mesh, axes) if axes else 1


def plan_mesh(config, num_local_devices: int | None = None) -> tuple[dict, int]:
  """({axis: size}, chips) to plan for: `plan.mesh`, or `plan.devices` chips (default: this machine's) laid out
  as train.mesh says (its -1 axis takes the rest); plan `dp` puts every chip on the data axis."""
  p = config.plan
  if p.mesh:
    fixed = [s for s in p.mesh if s != -1]
    devices = p.devices or (math.prod(fixed) if -1 not in p.mesh else num_local_devices or jax.device_count())
    sizes = parallel.mesh_sizes(tuple(p.mesh), devices)
  else:
    devices = p.devices or num_local_devices or jax.device_count()
    shape = (devices, 1, 1) if config.sharding.plan == "dp" else tuple(config.train.mesh)
    sizes = parallel.mesh_sizes(shape, devices)
  return dict(zip(parallel.MESH_AXES, sizes)), devices


def step_shape(config, documents: int, batch_shards: int) -> StepShape:
  """The step's sizes for `documents` documents from the config (its plan.* lengths); questions padded as the
  trainer pads them, to a multiple of the batch shards."""
  p = config.plan
  questions = documents * config.data.questions_per_document
  return StepShape(documents=documents, atoms=p.atoms_per_document, span_tokens=config.atoms.max_atom_tokens,
                   doc_tokens=p.doc_tokens, questions=-(-questions // batch_shards) * batch_shards,
                   question_tokens=p.question_tokens, student_tokens=p.student_tokens, answer_tokens=p.answer_tokens)


def check_config(config) -> None:
  """The sizes a plan reads must make sense: -1 chips or a zero-token answer would print negative bytes and
  a 2,147,483,647-document batch instead of an error."""
  from doc2atom_jax.atoms import bank as bank_lib

  p = config.plan
  errors.at_least("plan.devices", p.devices, 0)  # 0 = this machine's
  errors.positive("plan.device_memory_gb", p.device_memory_gb)
  errors.at_least("plan.bank_atoms", p.bank_atoms, 0)
  for name in ("doc_tokens", "atoms_per_document", "question_tokens", "student_tokens", "answer_tokens"):
    errors.at_least(f"plan.{name}", p[name], 1)
  errors.at_least("data.documents_per_step", config.data.documents_per_step, 1)
  errors.at_least("data.questions_per_document", config.data.questions_per_document, 1)
  errors.at_least("atoms.max_atom_tokens", config.atoms.max_atom_tokens, 1)
  errors.one_of("atoms.code_dtype", config.atoms.code_dtype, bank_lib.CODE_DTYPES)


def make_plan(config, num_local_devices: int | None = None) -> dict:
  """The plan of a config: mesh, per-chip bytes by kind, and the largest documents_per_step that fits."""
  from doc2atom_jax.atoms import bank as bank_lib
  from doc2atom_jax.train import step as step_lib

  check_config(config)
  rules = parallel.rules_for(config.sharding.plan, config.sharding.rules)
  mesh, devices = plan_mesh(config, num_local_devices)
  model_cfg, source = decoder_config(config.model.name, config.model.dtype)
  compiler_cfg = compiler_config(config, model_cfg)
  state, logical = abstract_trainable(compiler_cfg)
  local = trainable_shards(state, logical, mesh, rules)
  batch_shards = parallel._mesh_size(mesh, parallel.batch_axes(rules))
  tensor = _tensor_shards(mesh, rules)
  passes = 2 if (step_lib.loss_config(config).atom or step_lib.loss_config(config).null) else 1

  def activations(documents):
    return activation_bytes(model_cfg, compiler_cfg, step_shape(config, documents, batch_shards),
                            batch_shards=batch_shards, tensor_shards=tensor, student_passes=passes)

  fixed = {"base model parameters (frozen)": _nbytes(base_weight_shards(model_cfg, mesh, rules)),
           "trainable parameters (compiler + router)": _nbytes(local),
           "optimizer state (AdamW: 2 x trainable + counts)": _nbytes(optimizer_shards(config, local)),
           "gradients (= trainable)": _nbytes(local)}
  act = activations(config.data.documents_per_step)
  rows = dict(fixed)
  rows[f"activations (estimate, {config.data.documents_per_step} documents/step)"] = sum(act.values())
  rows["total (training)"] = sum(rows.values())
  atoms = bank_lib.bucket_size(config.plan.bank_atoms) if config.plan.bank_atoms else 0
  code_shape = (model_cfg.num_layers, compiler_cfg.num_targets, compiler_cfg.rank, compiler_cfg.code_dim)
  bank = {"codes": jax.ShapeDtypeStruct((atoms, *code_shape), bank_lib.CODE_DTYPES[config.atoms.code_dtype]),
          "keys": jax.ShapeDtypeStruct((atoms, compiler_cfg.key_dim), np.float32),
          "mask": jax.ShapeDtypeStruct((atoms,), np.bool_)}
  bank_local = {n: _shard(x.shape, x.dtype, parallel.BANK_AXES[n], mesh, rules) for n, x in bank.items()}
  rows[f"atom bank ({config.plan.bank_atoms:,} atoms, {config.atoms.code_dtype} codes + keys)"] = _nbytes(bank_local)

  budget = config.plan.device_memory_gb * GiB
  base = sum(fixed.values())
  fits = lambda n: base + sum(activations(n).values()) <= budget
  largest = 0
  if fits(1):
    hi = 1
    while fits(hi * 2) and hi < 1 << 30:
      hi *= 2
    lo, hi = hi, hi * 2  # fits(lo), not fits(hi)
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    largest = lo
  return {"model": config.model.name, "shapes_from": source, "plan": config.sharding.plan,
          "rules": [list(r) for r in rules], "mesh": mesh, "devices": devices, "batch_shards": batch_shards,
          "bytes_per_device": rows, "activation_parts": act, "device_memory_gb": config.plan.device_memory_gb,
          "largest_documents_per_step": largest,
          "global_bytes": {"trainable parameters": _nbytes(state), "base model parameters": _nbytes(
              base_weight_shards(model_cfg, dict.fromkeys(mesh, 1), rules))}}


def _size(n: float) -> str:
  for unit, scale in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
    if n >= scale:
      return f"{n / scale:,.2f} {unit}"
  return f"{int(n)} B"


def format_plan(plan: dict) -> str:
  mesh = " x ".join(f"{a}={s}" for a, s in plan["mesh"].items())
  lines = [f"model {plan['model']} (shapes: {plan['shapes_from']}); plan {plan['plan']}; {plan['devices']} chips, "
           f"mesh {mesh}; the batch splits {plan['batch_shards']} ways",
           f"whole: base model {_size(plan['global_bytes']['base model parameters'])}, trainable "
           f"{_size(plan['global_bytes']['trainable parameters'])}", "",
           f"{'per chip':<62} {'bytes':>14}"]
  width = max(map(len, plan["bytes_per_device"])) + 2
  for name, value in plan["bytes_per_device"].items():
    lines.append(f"  {name:<{max(width, 60)}} {_size(value):>14}")
  lines.append("  activations by part: " + ", ".join(f"{k} {_size(v)}" for k, v in plan["activation_parts"].items()))
  largest = plan["largest_documents_per_step"]
  lines.append(f"largest documents_per_step that fits {plan['device_memory_gb']:g} GB a chip (training, bank not "
               f"counted): {largest if largest else 'none (the weights alone do not fit)'}")
  return "\n".join(lines)


def main(config, workdir: pathlib.Path | None) -> dict:
  """Prints the plan (and writes <workdir>/plan.json when a workdir is given)."""
  from doc2atom_jax import fileio

  if workdir is not None:
    fileio.writable_dir(workdir, "--workdir")
  plan = make_plan(config)
  print(format_plan(plan))
  if workdir is not None:
    workdir.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(workdir / "plan.json", json.dumps(plan, indent=1))
    print(f"wrote {workdir / 'plan.json'}")
  return plan
