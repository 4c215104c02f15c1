"""The performance benchmark (issue 7): one process, one model, the same documents; a table of ratios against
the targets, `bench.json` (every number with its spread, the config, git revision, machine) and `bench.png`.

Run: python -m doc2atom_jax.bench --config=configs/bench.py [--workdir=DIR] [--config.bench.output=DIR]

Figures (each the median of `bench.repeats` timed runs after one untimed warm-up that absorbs compilation;
documents of `bench.long_from` tokens or more get `bench.long_repeats` (a pass over ~7,600 tokens takes most
of a minute on 2 CPU cores); the spread is min / max / interquartile range of the timed runs):
- answer latency at each document length: `doc2atom` = route the question over the document's atoms +
  compose the adapter + generate `new_tokens` tokens (the document compiled beforehand: that is its
  internalization), vs `in_context` = prefill the document and the question + generate the same tokens
  (`AtomSystem.answer` and `BaseModel.generate`, the paths `ask` and `generate` run; stop tokens ignored, so
  both generate exactly `new_tokens`);
- a forward pass with a composed adapter of k·r ranks (k atoms of rank r, plus the always-on default
  adapter) vs the plain forward, on `forward_tokens` tokens;
- bytes per document: atom codes (+ keys) vs a Doc-to-LoRA adapter (rank-8 factors per chunk) vs the
  KV cache (`eval/costs.py` formulas): codes and keys as a bank stores them, in each of `bench.storage_forms`
  (code_dtype/key_dtype, e.g. int8 codes with a float32 scale per atom and layer); factors and KV cache at
  `costs.float_bytes(atoms.code_dtype)` (bfloat16 unless codes are float32);
- compiling a document (`AtomSystem.compile_document`: frozen pass + compiler) vs one forward pass of the base
  model over the same tokens (padded alike);
- a training step (`train/step.py`, jitted) on one synthetic document: tokens/s and FLOP/s (XLA's
  cost_analysis of the compiled step) vs a measured f32 matmul ceiling on this machine;
- routing (scores + top-k, `router.select` with `blocks`) over banks of synthetic unit keys: time vs bank size
  and the log-log growth exponent.
"""

import functools
import io
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from doc2atom_jax import cli, variants
from doc2atom_jax.atoms import encode
from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import costs as costs_lib

# ---------------------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
  """Wall seconds of `fn()` (its result blocked on): median and spread of `repeats` runs after `warmup`."""
  return summary(costs_lib.timed_runs(fn, repeats, warmup))


def summary(times) -> dict:
  q1, median, q3 = (float(x) for x in np.percentile(times, [25, 50, 75]))
  return {"median": median, "min": float(min(times)), "max": float(max(times)), "iqr": q3 - q1,
          "repeats": len(times), "times": [float(t) for t in times]}


def _ratio(a: dict, b: dict) -> dict:
  """The ratio of two timings' medians, with the range its spread allows (min/max, max/min)."""
  return {"median": a["median"] / b["median"], "low": a["min"] / b["max"], "high": a["max"] / b["min"]}


def growth_exponent(sizes, seconds) -> float:
  """The slope of log(time) against log(size): 1 = linear, below 1 = sublinear."""
  return float(np.polyfit(np.log(np.asarray(sizes, float)), np.log(np.asarray(seconds, float)), 1)[0])


# ---------------------------------------------------------------------------------------------------------
# Settings.
# ---------------------------------------------------------------------------------------------------------
def _ints(values, name: str, *, minimum: int = 1) -> tuple[int, ...]:
  try:
    out = tuple(int(v) for v in values)
  except (TypeError, ValueError):
    raise UserError(f"bench.{name} must be a tuple of integers, got {values!r}") from None
  if not out:
    raise UserError(f"bench.{name} is empty")
  if any(v < minimum for v in out):
    raise UserError(f"bench.{name} must be >= {minimum}, got {out}")
  return out


def check_settings(b) -> dict:
  """The bench section, checked before the model loads (lengths are checked against its context later)."""
  s = {"lengths": tuple(sorted(set(_ints(b.lengths, "lengths")))), "kr": _ints(b.kr, "kr"),
       "bank_sizes": tuple(sorted(set(_ints(b.bank_sizes, "bank_sizes")))),
       "query_batches": _ints(b.query_batches, "query_batches")}
  for name in ("repeats", "long_repeats", "long_from", "new_tokens", "forward_tokens", "forward_batch",
               "forward_groups", "forward_batch_tokens", "matmul_size", "route_blocks", "route_k"):
    value = getattr(b, name)
    if not isinstance(value, int) or value < 1:
      raise UserError(f"bench.{name} must be an integer >= 1, got {value!r}")
    s[name] = value
  if s["route_k"] > min(s["bank_sizes"]):
    raise UserError(f"bench.route_k={s['route_k']} exceeds the smallest bank ({min(s['bank_sizes'])} atoms)")
  targets = {}
  for length, bound in b.answer_targets:
    targets[int(length)] = float(bound)
  s["answer_targets"] = targets
  s["forward_target"] = (int(b.forward_target[0]), float(b.forward_target[1]))
  s["bytes_target"] = (int(b.bytes_target[0]), float(b.bytes_target[1]))
  s["route_approx"] = bool(b.get("route_approx", False))
  s["storage_forms"] = tuple(b.get("storage_forms", ("bfloat16/float32",)))
  for form in s["storage_forms"]:
    code_dtype, _, key_dtype = form.partition("/")
    if code_dtype not in ("bfloat16", "float32", "int8") or key_dtype not in ("bfloat16", "float32"):
      raise UserError(f"bench.storage_forms: {form!r} is not code_dtype/key_dtype with code_dtype in "
                      "bfloat16, float32, int8 and key_dtype in float32, bfloat16")
  s["compile_target"] = float(b.compile_target)
  s["routing_exponent_target"] = float(b.routing_exponent_target)
  return s


def output_folder(config, workdir: pathlib.Path | None) -> pathlib.Path:
  if config.bench.output:
    return pathlib.Path(config.bench.output).expanduser()
  if workdir is not None:
    return workdir / "bench"
  raise UserError("set --workdir (the results go to <workdir>/bench) or --config.bench.output")


# ---------------------------------------------------------------------------------------------------------
# The measurements.
# ---------------------------------------------------------------------------------------------------------
def _documents(config, count: int = 8):
  """Synthetic test-split documents (never trained on) to join to each measured length."""
  from doc2atom_jax.data import synthetic  # pylint: disable=import-outside-toplevel

  return [synthetic.document("test", i, seed=config.seed, facts_per_document=16, questions_per_document=4)
          for i in range(count)]


def _forward_fn(model, tokens, mask, adapter=None):
  from doc2atom_jax.models import base  # pylint: disable=import-outside-toplevel

  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  return lambda: base._forward(model.weights, model.config, tokens, mask, adapter, False, True).logits  # pylint: disable=protected-access


def measure_documents(system, config, s: dict, log, step: Callable[[], None] = lambda: None) -> tuple[dict, dict]:
  """Per document length: answer latency (both methods, through the public paths a user runs), compile vs
  forward, bytes per document. Also returns length -> (text, bank) for the composed-forward figures."""
  import dataclasses  # pylint: disable=import-outside-toplevel

  from doc2atom_jax.data import prompts  # pylint: disable=import-outside-toplevel
  from doc2atom_jax.eval import quick  # pylint: disable=import-outside-toplevel

  model = system.model
  synthetic_docs = _documents(config)
  texts = [d.text for d in synthetic_docs]
  question = synthetic_docs[0].questions[0].question
  number_bytes = costs_lib.float_bytes(config.atoms.code_dtype)  # factors and KV cache (bfloat16 for int8 codes)
  d2l_cfg = dataclasses.replace(system.cfg, rank=variants.D2L_RANK)
  out, banks = {}, {}
  for length in s["lengths"]:
    repeats = s["long_repeats"] if length >= s["long_from"] else s["repeats"]
    text = costs_lib.text_of_length(model, texts, length)
    doc_tokens = costs_lib.count_tokens(model, text)
    compiled = []
    compile_once = lambda: compiled.append(system.compile_document(text, f"bench-{length}")) or compiled[-1].codes  # pylint: disable=cell-var-from-loop
    r = {"tokens": doc_tokens, "text_bytes": len(text.encode("utf-8")), "repeats": repeats,
         "compile_seconds": timed(compile_once, repeats)}
    r["atoms"] = len(compiled[-1].atoms)
    # The timed compile is the document's internalization; the bank is what `ask` would load from disk.
    bank = quick.in_memory_bank([compiled[-1]], config.atoms.code_dtype, config.atoms.key_dtype,
                                shared_tail=system.cfg.copy_dim)
    context = model.config.max_position_embeddings
    ids = np.asarray(model.encode(text), np.int32)[:context]
    r["forward_seconds"] = timed(_forward_fn(model, *encode.padded_document(ids, context)), repeats)
    n = s["new_tokens"]  # stop tokens ignored: both generate exactly n tokens
    r["answer_seconds"] = {
        "doc2atom": timed(lambda: system.answer(bank, [question], max_new_tokens=n, stop=False), repeats),  # pylint: disable=cell-var-from-loop
        "in_context": timed(lambda: model.generate([prompts.in_context_prompt(text, question)], max_new_tokens=n,  # pylint: disable=cell-var-from-loop
                                                   stop=False), repeats)}
    r["answer_ratio"] = _ratio(r["answer_seconds"]["doc2atom"], r["answer_seconds"]["in_context"])
    r["compile_ratio"] = _ratio(r["compile_seconds"], r["forward_seconds"])
    codes_of = lambda code_dtype, key_dtype: costs_lib.document_bytes(  # pylint: disable=cell-var-from-loop
        "doc2atom", tokens=doc_tokens, atoms=r["atoms"], text_bytes=r["text_bytes"],
        compiler_cfg=system.cfg, model_cfg=model.config, trunc_tokens=256, number_bytes=number_bytes,
        code_dtype=code_dtype, key_dtype=key_dtype)["codes"]
    codes = codes_of(config.atoms.code_dtype, config.atoms.key_dtype)
    chunk = config.atoms.chunk_tokens
    chunks = -(-doc_tokens // chunk) if chunk else 1
    d2l = costs_lib.factor_bytes(d2l_cfg, chunks, number_bytes)
    kv = costs_lib.kv_cache_bytes(model.config, doc_tokens, number_bytes)
    forms = {form: codes_of(*form.split("/")) for form in s["storage_forms"]}
    r["bytes"] = {"atom_codes": codes, "d2l_adapter": d2l, "kv_cache": kv, "d2l_chunks": chunks,
                  "codes_over_kv": codes / kv, "d2l_over_kv": d2l / kv,
                  "storage": f"{config.atoms.code_dtype}/{config.atoms.key_dtype}",
                  "forms": {form: {"atom_codes": b, "codes_over_kv": b / kv} for form, b in forms.items()}}
    out[length] = r
    banks[length] = text, bank
    a = r["answer_seconds"]
    log(f"  {length} tokens ({r['atoms']} atoms): answer doc2atom {a['doc2atom']['median'] * 1e3:.0f} ms, "
        f"in_context {a['in_context']['median'] * 1e3:.0f} ms; compile {r['compile_seconds']['median'] * 1e3:.0f} ms"
        f" vs forward {r['forward_seconds']['median'] * 1e3:.0f} ms")
    step()
  return out, banks


def measure_composed_forward(system, text: str, bank, s: dict, log) -> dict:
  """A forward with a composed adapter of k·r ranks vs the plain forward, on `forward_tokens` tokens."""
  model, rank = system.model, system.cfg.rank
  ids = model.encode(text)[:min(s["forward_tokens"], model.config.max_position_embeddings)]
  tokens, mask = np.asarray([ids], np.int32), np.ones((1, len(ids)), bool)
  out = {"tokens": len(ids), "rank_per_atom": rank, "default_rank": system.cfg.default_rank,
         "plain_seconds": timed(_forward_fn(model, tokens, mask), s["repeats"]), "by_kr": {}}
  for kr in s["kr"]:
    if kr % rank:
      raise UserError(f"bench.kr={kr} is not a multiple of the atoms' rank {rank}")
    k = kr // rank
    indices = (np.arange(k) % len(bank.atoms))[None].astype(np.int32)  # atoms repeat in a small bank: same cost
    weights = np.full((1, k), 1.0 / k, np.float32)
    adapter = system.adapter(bank, jnp.asarray(indices), jnp.asarray(weights))
    composed = timed(_forward_fn(model, tokens, mask, adapter), s["repeats"])
    compose_time = timed(lambda: system.adapter(bank, jnp.asarray(indices), jnp.asarray(weights)), s["repeats"])  # pylint: disable=cell-var-from-loop
    out["by_kr"][kr] = {"k": k, "composed_seconds": composed, "compose_seconds": compose_time,
                        "ratio": _ratio(composed, out["plain_seconds"])}
    log(f"  k·r={kr}: composed forward {composed['median'] * 1e3:.1f} ms vs plain "
        f"{out['plain_seconds']['median'] * 1e3:.1f} ms")
  out["batched"] = measure_batched_forms(system, bank, ids, s, log)
  return out


def measure_batched_forms(system, bank, ids, s: dict, log) -> dict:
  """A batch of questions whose adapters come in a few groups (questions sharing atoms): the gather form
  (one adapter per question) vs the grouped form (`jax.lax.ragged_dot` over the group's rows) vs plain."""
  from doc2atom_jax.models import adapter as adapter_lib  # pylint: disable=import-outside-toplevel

  model, rank = system.model, system.cfg.rank
  batch, groups, length = s["forward_batch"], s["forward_groups"], s["forward_batch_tokens"]
  k = max(1, s["forward_target"][0] // rank)
  indices = (np.arange(groups * k).reshape(groups, k) % len(bank.atoms)).astype(np.int32)
  per_group = system.adapter(bank, jnp.asarray(indices), jnp.full((groups, k), 1.0 / k, jnp.float32))
  grouped = per_group._replace(groups=jnp.asarray(np.arange(batch) * groups // batch, jnp.int32))
  gathered = adapter_lib.ungroup(grouped)
  tokens = np.asarray([(ids * (1 + length // len(ids)))[:length]] * batch, np.int32)
  mask = np.ones_like(tokens, bool)
  out = {"questions": batch, "groups": groups, "tokens_per_question": length, "k": k,
         "plain_seconds": timed(_forward_fn(model, tokens, mask), s["repeats"]),
         "gather_seconds": timed(_forward_fn(model, tokens, mask, gathered), s["repeats"]),
         "grouped_seconds": timed(_forward_fn(model, tokens, mask, grouped), s["repeats"])}
  out["grouped_over_gather"] = _ratio(out["grouped_seconds"], out["gather_seconds"])
  log(f"  {batch} questions in {groups} groups, k·r={k * rank}: plain {_ms(out['plain_seconds'])}, gather "
      f"{_ms(out['gather_seconds'])}, grouped (ragged_dot) {_ms(out['grouped_seconds'])}")
  return out


def _flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled computation, where the backend reports one."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (backends without cost analysis)
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def measure_matmul_ceiling(s: dict) -> dict:
  """FLOP/s of a large f32 matmul on this machine: the ceiling a step's achieved FLOP/s is compared with."""

  n = s["matmul_size"]
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  seconds = timed(lambda: matmul(a, b), s["repeats"])
  flops = 2.0 * n**3
  return {"size": n, "flops": flops, "seconds": seconds, "flops_per_second": flops / seconds["median"]}


def measure_train_step(system, config, s: dict, ceiling: dict, log) -> dict:
  """One jitted train step on one synthetic training document: tokens/s and FLOP/s."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from doc2atom_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  from doc2atom_jax.data import records  # pylint: disable=import-outside-toplevel
  from doc2atom_jax.train import batch as batch_lib  # pylint: disable=import-outside-toplevel
  from doc2atom_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel

  model = system.model
  doc = synthetic.document("train", 0, seed=config.seed, facts_per_document=tuple(config.data.facts_per_document),
                           questions_per_document=config.data.questions_per_document)
  questions = tuple(records.TrainQuestion(q.qid, q.question, q.answer, tuple(q.evidence) or None,
                                       out_of_scope=q.kind == "out_of_scope", answer_prefix=q.answer_prefix)
                    for q in doc.questions)
  batch = batch_lib.build(model, [records.TrainDocument(doc.atomized(model.tokenizer), questions)])
  batch = jax.tree.map(jnp.asarray, batch)
  graphdef, params = nnx.split((system.compiler, system.router))
  t = config.train
  optimizer = step_lib.make_optimizer(t.learning_rate, t.warmup_steps, t.steps, t.weight_decay, t.clip_norm)
  opt_state = optimizer.init(params)
  kw = dict(graphdef=graphdef, model_cfg=model.config, loss_cfg=step_lib.loss_config(config), optimizer=optimizer)
  step = jax.jit(functools.partial(step_lib.train_step, **kw))
  flops = _flops(step.lower(params, opt_state, model.weights, batch).compile())
  seconds = timed(lambda: step(params, opt_state, model.weights, batch), s["repeats"])
  real = {"document": int(np.asarray(batch["doc_mask"]).sum()), "student": int(np.asarray(batch["s_mask"]).sum()),
          "question": int(np.asarray(batch["q_mask"]).sum())}
  tokens = sum(real.values())
  padded = int(sum(np.asarray(batch[k]).size for k in ("doc_mask", "s_mask", "q_mask")))
  out = {"tokens": tokens, "tokens_by_pass": real, "padded_tokens": padded, "questions": len(questions),
         "seconds": seconds, "tokens_per_second": tokens / seconds["median"], "flops": flops,
         "flops_source": "XLA cost_analysis of the compiled step" if flops else "unavailable on this backend"}
  if flops:
    out["flops_per_second"] = flops / seconds["median"]
    out["fraction_of_ceiling"] = out["flops_per_second"] / ceiling["flops_per_second"]
  log(f"  train step: {seconds['median'] * 1e3:.0f} ms, {out['tokens_per_second']:.0f} tokens/s"
      + (f", {out['flops_per_second'] / 1e9:.2f} GFLOP/s ({out['fraction_of_ceiling']:.1%} of the matmul ceiling)"
         if flops else ""))
  return out


@functools.partial(jax.jit, static_argnames=("k", "blocks", "approximate"))
def _route_bank(split_router, queries, keys, key_mask, null_key, *, k: int, blocks: int, approximate: bool):
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from doc2atom_jax.atoms import router as router_lib  # pylint: disable=import-outside-toplevel

  router = nnx.merge(*split_router)
  return router_lib.select(router.scores(queries, keys, key_mask, null_key), k, "softmax", blocks,
                           approximate=approximate)


def measure_routing(system, s: dict, log) -> dict:
  """Routing (the router's scores + top-k with `blocks`) over synthetic unit keys: time vs bank size."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  d = system.cfg.key_dim
  split_router = nnx.split(system.router)
  null_key = system.compiler.null()[1]
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  out = {"key_dim": d, "k": s["route_k"], "blocks": s["route_blocks"], "approximate": s["route_approx"],
         "keys": "synthetic unit Gaussian keys",
         "by_batch": {}}
  for batch in s["query_batches"]:
    queries = unit(jax.random.normal(jax.random.key(batch), (batch, d), jnp.float32))
    rows = {}
    for n in s["bank_sizes"]:
      keys = jax.block_until_ready(unit(jax.random.normal(jax.random.key(n), (n, d), jnp.float32)))
      route = functools.partial(_route_bank, split_router, queries, keys, jnp.ones((n,), bool), null_key,
                                k=s["route_k"], blocks=s["route_blocks"], approximate=s["route_approx"])
      rows[n] = timed(route, s["repeats"])
      keys = route = None  # the largest banks' keys are not kept past their timing
    sizes = list(rows)
    medians = [rows[n]["median"] for n in sizes]
    entry = {"seconds": rows}
    if len(sizes) > 1:
      entry["exponent"] = growth_exponent(sizes, medians)
      entry["exponent_last_step"] = growth_exponent(sizes[-2:], medians[-2:])
    out["by_batch"][batch] = entry
    log(f"  routing, {batch} quer{'y' if batch == 1 else 'ies'}: " + ", ".join(
        f"{n}: {rows[n]['median'] * 1e3:.2f} ms" for n in sizes)
        + (f"; growth exponent {entry['exponent']:.2f}" if "exponent" in entry else ""))
  return out


# ---------------------------------------------------------------------------------------------------------
# The table, against the targets.
# ---------------------------------------------------------------------------------------------------------
def _status(value: float | None, bound: float | None) -> str:
  if bound is None:
    return "-"
  if value is None:
    return "not measured"
  return "met" if value <= bound else "MISSED"


def _row(figure, value, ratio=None, bound=None, status=None) -> dict:
  return {"figure": figure, "value": value, "ratio": ratio, "target": None if bound is None else f"<= {bound:g}",
          "status": status if status is not None else _status(ratio, bound)}


def _ms(t: dict) -> str:
  return f"{t['median'] * 1e3:.1f} ms [{t['min'] * 1e3:.1f}-{t['max'] * 1e3:.1f}]"


def _size(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)


def table_rows(results: dict, s: dict) -> list[dict]:
  rows = []
  docs = results["documents"]
  for length, r in docs.items():
    a = r["answer_seconds"]
    rows.append(_row(f"answer latency @ {length} tok (doc2atom / in_context)",
                     f"{_ms(a['doc2atom'])} / {_ms(a['in_context'])}", r["answer_ratio"]["median"],
                     s["answer_targets"].get(length)))
  for length, bound in s["answer_targets"].items():
    if length not in docs:
      rows.append(_row(f"answer latency @ {length} tok (doc2atom / in_context)", "not measured", None, bound))
  f = results["composed_forward"]
  for kr, r in f["by_kr"].items():
    bound = s["forward_target"][1] if kr == s["forward_target"][0] else None
    rows.append(_row(f"composed forward k·r={kr} / plain ({f['tokens']} tok)",
                     f"{_ms(r['composed_seconds'])} / {_ms(f['plain_seconds'])}", r["ratio"]["median"], bound))
  g = f.get("batched")
  if g:
    rows.append(_row(f"{g['questions']} questions, {g['groups']} adapter groups: grouped (ragged_dot) / gather",
                     f"{_ms(g['grouped_seconds'])} / {_ms(g['gather_seconds'])}", g["grouped_over_gather"]["median"]))
  if s["forward_target"][0] not in f["by_kr"]:
    rows.append(_row(f"composed forward k·r={s['forward_target'][0]} / plain", "not measured", None,
                     s["forward_target"][1]))
  for length, r in docs.items():
    b = r["bytes"]
    bound = s["bytes_target"][1] if length == s["bytes_target"][0] else None
    for form, f_bytes in b["forms"].items():
      rows.append(_row(f"bytes/doc @ {length} tok: codes ({form}) / KV (d2l {_size(b['d2l_adapter'])})",
                       f"{_size(f_bytes['atom_codes'])} / {_size(b['kv_cache'])}", f_bytes["codes_over_kv"], bound))
  if s["bytes_target"][0] not in docs:
    rows.append(_row(f"bytes/doc @ {s['bytes_target'][0]} tok: codes / KV", "not measured", None,
                     s["bytes_target"][1]))
  for length, r in docs.items():
    rows.append(_row(f"compile / forward @ {length} tok", f"{_ms(r['compile_seconds'])} / {_ms(r['forward_seconds'])}",
                     r["compile_ratio"]["median"], s["compile_target"]))
  t, c = results["train_step"], results["matmul_ceiling"]
  rows.append(_row("train step tokens/s", f"{t['tokens_per_second']:.0f} tok/s ({t['tokens']} tok, "
                   f"{_ms(t['seconds'])})"))
  if t.get("flops"):
    rows.append(_row("train step FLOP/s / matmul ceiling", f"{t['flops_per_second'] / 1e9:.2f} / "
                     f"{c['flops_per_second'] / 1e9:.2f} GFLOP/s", t["fraction_of_ceiling"]))
  else:
    rows.append(_row("train step FLOP/s / matmul ceiling", f"FLOPs unavailable; ceiling "
                     f"{c['flops_per_second'] / 1e9:.2f} GFLOP/s"))
  route = results["routing"]
  for batch, r in route["by_batch"].items():
    sizes = list(r["seconds"])
    value = f"{_ms(r['seconds'][sizes[0]])} @ {sizes[0]} -> {_ms(r['seconds'][sizes[-1]])} @ {sizes[-1]}"
    rows.append(_row(f"routing time growth exponent, {batch} quer{'y' if batch == 1 else 'ies'}", value,
                     r.get("exponent"), s["routing_exponent_target"]))
  return rows


def format_table(rows: list[dict]) -> str:
  fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
  cells = [["figure", "value (median [min-max])", "ratio", "target", "status"]]
  cells += [[r["figure"], r["value"], fmt(r["ratio"]), r["target"] or "-", r["status"]] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(5)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------------------------------------
def git_revision() -> dict:
  root = pathlib.Path(__file__).resolve().parent.parent
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                           text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}
  if head.returncode:
    return {"commit": None, "dirty": None}
  return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def machine() -> dict:

  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
          else None, "python": sys.version.split()[0], "jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()]}


def plot(results: dict) -> bytes:
  """PNG: answer latency vs document length (both methods), routing time vs bank size."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
  docs = results["documents"]
  lengths = list(docs)
  for method, marker in (("doc2atom", "o"), ("in_context", "s")):
    t = [docs[n]["answer_seconds"][method] for n in lengths]
    med = np.asarray([x["median"] for x in t])
    err = [med - [x["min"] for x in t], [x["max"] for x in t] - med]
    ax1.errorbar(lengths, med, yerr=err, marker=marker, capsize=3, label=method)
  ax1.set(xscale="log", yscale="log", xlabel="document tokens", ylabel="seconds per answer",
          title=f"answer latency ({results['settings']['new_tokens']} new tokens)")
  ax1.set_xticks([int(n) for n in lengths], [str(n) for n in lengths])
  ax1.minorticks_off()
  ax1.legend()
  for batch, r in results["routing"]["by_batch"].items():
    sizes = list(r["seconds"])
    med = np.asarray([r["seconds"][n]["median"] for n in sizes])
    err = [med - [r["seconds"][n]["min"] for n in sizes], [r["seconds"][n]["max"] for n in sizes] - med]
    slope = f", slope {r['exponent']:.2f}" if "exponent" in r else ""
    ax2.errorbar(sizes, med, yerr=err, marker="o", capsize=3, label=f"{batch} quer{'y' if batch == 1 else 'ies'}{slope}")
  ax2.set(xscale="log", yscale="log", xlabel="atoms in the bank", ylabel="seconds",
          title=f"routing (top-{results['routing']['k']}, {results['routing']['blocks']} blocks)")
  ax2.legend()
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  plt.close(fig)
  return buffer.getvalue()


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  return x


# ---------------------------------------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------------------------------------
def run(config, workdir: pathlib.Path | None, log: Callable[[str], None] = print) -> dict:
  """The whole benchmark -> results (also written to <output>/bench.json and bench.png; the table printed)."""
  from doc2atom_jax import fileio, system as system_lib  # pylint: disable=import-outside-toplevel
  from doc2atom_jax.eval import runner  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  s = check_settings(config.bench)
  output = output_folder(config, workdir)
  model = system_lib.load_model(config, scan_layers=config.bench.scan_layers)
  limit = model.config.max_position_embeddings - runner.QUESTION_RESERVE - s["new_tokens"]
  over = [n for n in s["lengths"] if n > limit]
  if over:
    raise UserError(f"bench.lengths {over} exceed what fits {model.name}'s context of "
                    f"{model.config.max_position_embeddings} tokens with a question and {s['new_tokens']} new tokens "
                    f"(at most {limit} document tokens)")
  system = system_lib.build_system(config, model=model)
  trained = bool(config.params)
  log(f"bench: {model.name}, compiler and router {'from ' + config.params if trained else 'untrained (initialized)'}"
      f"; {s['repeats']} timed repetitions after a warm-up per figure")
  results = {"settings": {k: v for k, v in s.items()}, "model": model.name,
             "params": config.params or "untrained (initialized): timing does not depend on training"}
  # A bar over the figure groups (each length, then composed forward, training, routing) with an ETA.
  bar = tqdm.tqdm(total=len(s["lengths"]) + 3, desc="bench", unit="figure", dynamic_ncols=True)
  step = lambda: bar.update(1)
  log("documents:")
  results["documents"], banks = measure_documents(system, config, s, log, step)
  log("composed forward:")
  results["composed_forward"] = measure_composed_forward(system, *banks[s["lengths"][0]], s, log)
  step()
  log("training:")
  results["matmul_ceiling"] = measure_matmul_ceiling(s)
  log(f"  matmul ceiling: {results['matmul_ceiling']['flops_per_second'] / 1e9:.2f} GFLOP/s "
      f"(f32 {s['matmul_size']}x{s['matmul_size']})")
  results["train_step"] = measure_train_step(system, config, s, results["matmul_ceiling"], log)
  step()
  log("routing:")
  results["routing"] = measure_routing(system, s, log)
  step()
  bar.close()
  rows = table_rows(results, s)
  results["table"] = rows
  results["targets_missed"] = [r["figure"] for r in rows if r["status"] == "MISSED"]
  results["config"] = json.loads(json.dumps(config.to_dict(), default=list))
  results["git"] = git_revision()
  results["machine"] = machine()
  results["wall_seconds"] = time.perf_counter() - start
  output.mkdir(parents=True, exist_ok=True)
  fileio.atomic_write_text(output / "bench.json", json.dumps(_jsonable(results), indent=1))
  png = plot(results)
  with fileio.atomic_open(output / "bench.png", "wb") as f:
    f.write(png)
  log("\n" + format_table(rows))
  log(f"\nbench: {len(rows)} figures, {len(results['targets_missed'])} target(s) missed, "
      f"{results['wall_seconds']:.0f} s -> {output / 'bench.json'}, {output / 'bench.png'}")
  return results


def job(config, workdir: pathlib.Path | None) -> dict:
  """mode=bench (and `python -m doc2atom_jax.bench`): the benchmark of a config with a `bench` section."""
  if "bench" not in config:
    raise UserError("the config has no `bench` section: use --config=configs/bench.py")
  return run(config, workdir)


def main(args=()) -> None:
  """`python -m doc2atom_jax.bench --config=configs/bench.py`: mode=bench under main's flags and errors."""
  del args
  config = cli.config(example="configs/bench.py")
  cli.prepare(config)
  job(config, cli.workdir())


if __name__ == "__main__":
  cli.run(main)
