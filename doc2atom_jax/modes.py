"""What each `config.mode` does. `main.py` only parses flags and dispatches here."""

import json
import pathlib
import re
import sys
import time

from doc2atom_jax import errors, fileio
from doc2atom_jax.system import build_system, check_trained, export_meta, load_model
from doc2atom_jax.data import prompts
from doc2atom_jax.errors import UserError

TRUNCATIONS = ("error", "left")  # models.BaseModel.generate: refuse long prompts, or keep their end


def generate(config, workdir: pathlib.Path | None) -> list[dict]:
  """Answers questions with the document in the prompt (the `in_context` baseline) and prints them."""
  g = config.generate
  document = fileio.read_text(g.document_file) if g.document_file else g.document
  questions = [g.question] if g.question else list(g.questions)
  if not document.strip():
    raise UserError("the document is empty: set generate.document or generate.document_file")
  if not questions or any(not q.strip() for q in questions):
    raise UserError("empty question: set generate.question or generate.questions")
  errors.at_least("generate.max_new_tokens", g.max_new_tokens, 1)
  errors.at_least("generate.temperature", g.temperature, 0)
  errors.positive("generate.top_p", g.top_p)
  if g.top_p > 1:
    raise UserError(f"--config.generate.top_p={g.top_p!r} must be at most 1 (a probability mass)")
  errors.one_of("generate.truncation", g.truncation, TRUNCATIONS)
  if workdir is not None:
    fileio.writable_dir(workdir, "--workdir")
  model = load_model(config)
  start = time.perf_counter()
  answers = model.generate([prompts.in_context_prompt(document, q) for q in questions],
                           max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                           seed=config.seed, truncation=g.truncation,
                           answer_prefixes=[g.get("answer_prefix", "")] * len(questions))
  seconds = time.perf_counter() - start
  records = [{"question": q, "answer": a.strip(), "model": model.name} for q, a in zip(questions, answers)]
  for r in records:
    print(f"Q: {r['question']}\nA: {r['answer']}\n")
  print(f"({len(records)} answers in {seconds:.1f} s with {model.name})")
  if workdir is not None:
    out = workdir / "generate.jsonl"
    fileio.atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {out}")
  return records



# ---------------------------------------------------------------------------------------------------------
# The atom system: compile documents into a bank, ask a bank a question.
# ---------------------------------------------------------------------------------------------------------
def read_documents(path) -> list[tuple[str, str]]:
  """(doc_id, text) pairs from a JSONL file, one document per distinct doc_id (QA files repeat contexts)."""
  docs: dict[str, str] = {}
  for number, line in enumerate(fileio.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
      raise UserError(f"{path}:{number}: expected a JSON object")
    doc_id = record.get("doc_id", record.get("id"))
    text = record.get("text", record.get("context"))
    if not isinstance(doc_id, str) or not isinstance(text, str):
      raise UserError(f'{path}:{number}: needs string fields "doc_id" (or "id") and "text" (or "context")')
    if doc_id in docs and docs[doc_id] != text:
      raise UserError(f"{path}:{number}: doc_id {doc_id!r} appears twice with different text")
    docs[doc_id] = text
  if not docs:
    raise UserError(f"{path} holds no documents")
  return list(docs.items())


def compile_documents(config, workdir: pathlib.Path | None) -> pathlib.Path:
  """Documents (JSONL) -> an atom bank on disk, appended document by document, each append atomic.

  Resumable: a document already in the bank with the same text (the bank's fingerprint being this compiler's)
  is skipped and counted, so the same command after a failure or a kill finishes the job; a stored id with
  other text is an error before anything is written. Everything checkable without the model comes first.
  """
  import tqdm

  from doc2atom_jax.atoms import bank as bank_lib

  if not config.compile.input:
    raise UserError("set --config.compile.input=<documents.jsonl>")
  errors.one_of("atoms.code_dtype", config.atoms.code_dtype, bank_lib.CODE_DTYPES)
  errors.one_of("atoms.key_dtype", config.atoms.get("key_dtype", "float32"), bank_lib.KEY_DTYPES)
  documents = read_documents(config.compile.input)
  if config.compile.bank:
    path = fileio.writable_dir(config.compile.bank, "the atom bank folder (compile.bank)")
  elif workdir is not None:
    path = fileio.writable_dir(workdir / "banks" / pathlib.Path(config.compile.input).stem,
                               "the atom bank folder (<workdir>/banks/<input name>)")
  else:
    raise UserError("set --workdir (the bank goes to <workdir>/banks/) or --config.compile.bank")
  exists = (path / bank_lib.MANIFEST).exists()
  stored = bank_lib.stored_texts(path) if exists else {}
  if not exists:
    bank_lib.check_new(path)
  conflicts = [doc_id for doc_id, text in documents if doc_id in stored and stored[doc_id] != text]
  if conflicts:
    shown = ", ".join(map(repr, conflicts[:5])) + (", ..." if len(conflicts) > 5 else "")
    raise UserError(f"{config.compile.input}: {len(conflicts)} document(s) already in the atom bank at {path} "
                    f"with other text ({shown}); give them other ids or compile into another bank")
  todo = [(doc_id, text) for doc_id, text in documents if doc_id not in stored]
  system = build_system(config)
  if exists:
    bank_lib.check_fingerprint(path, system.fingerprint)
  # Split every document before compiling any: a bad document fails the run before the bank is touched.
  splits = [system.split(text, doc_id) for doc_id, text in todo]
  if not exists:
    bank_lib.create(path, fingerprint=system.fingerprint, code_dtype=config.atoms.code_dtype,
                    key_dtype=config.atoms.get("key_dtype", "float32"), shared_tail=system.cfg.copy_dim,
                    meta={"method": config.atoms.method, "model": system.model.name, "config": config.to_dict()})
  total, start = 0, time.perf_counter()
  with tqdm.tqdm(total=len(todo), desc="compile", unit="doc", dynamic_ncols=True, disable=not todo) as bar:
    for (doc_id, text), split in zip(todo, splits):
      compiled = system.compile_document(text, doc_id, split)
      bank_lib.append(path, compiled, fingerprint=system.fingerprint)
      total += len(compiled.atoms)
      bar.set_postfix_str(f"{doc_id}: {len(compiled.atoms)} atoms", refresh=False)
      bar.update()
      bar.write(f"compiled {doc_id}: {len(compiled.atoms)} atoms", file=sys.stdout)
  skipped = len(documents) - len(todo)
  done = f"{len(todo)} documents, {total} atoms in {time.perf_counter() - start:.1f} s" if todo else "nothing to compile"
  print(f"bank {path}: {done}" + (f"; skipped {skipped} already in the bank" if skipped else ""))
  return path


def ask(config, workdir: pathlib.Path | None) -> list[dict]:
  """A question against a bank: the answer, and the atoms used with their weights and text spans."""
  from doc2atom_jax.atoms import bank as bank_lib

  del workdir
  if not config.ask.bank:
    raise UserError("set --config.ask.bank=<bank folder> (made by mode=compile)")
  if not config.ask.question.strip():
    raise UserError('empty question: set --config.ask.question="..."')
  errors.at_least("ask.max_new_tokens", config.ask.max_new_tokens, 1)
  _check_doc_id(bank_lib.info(config.ask.bank), config.ask.doc_id, "ask.doc_id")  # no bank: fails here
  system = build_system(config)
  bank = bank_lib.load(config.ask.bank, fingerprint=system.fingerprint)
  results = system.answer(bank, [config.ask.question], doc_id=config.ask.doc_id or None,
                          max_new_tokens=config.ask.max_new_tokens,
                          answer_prefixes=[config.ask.get("answer_prefix", "")])
  for r in results:
    print(f"Q: {r['question']}\nA: {r['answer']}" + ("  (abstained: the null atom ranked first)" if r["abstained"] else ""))
    _print_atoms(r["atoms"])
  return results


def _check_doc_id(info: dict, doc_id: str, name: str) -> None:
  """A document named for d2l / d2l_atom must be in the bank (bank_lib.info): checked before the model loads."""
  if doc_id and doc_id not in info["doc_ids"]:
    shown = ", ".join(map(repr, info["doc_ids"][:5])) + (", ..." if len(info["doc_ids"]) > 5 else "")
    raise UserError(f"--config.{name}={doc_id!r} is not in the atom bank at {info['path']} "
                    f"({len(info['doc_ids'])} documents: {shown})")


def _print_atoms(used: list[dict]) -> None:
  """The atoms of a composition, one a line: weight, then the null atom or the atom's text span."""
  for u in used:
    atom = u["atom"]
    where = "null atom" if atom == "null" else f"{atom['doc_id']}[{atom['chars'][0]}:{atom['chars'][1]}] {atom['text']!r}"
    print(f"  {u['weight']:.3f}  {where}")


MODES = {"generate": generate, "compile": compile_documents, "ask": ask}


def train(config, workdir: pathlib.Path | None):
  """The main job: train the compiler and router (checkpoints under <workdir>/checkpoints), export them,
  evaluate on held-out documents with the learning check."""
  from doc2atom_jax import distributed
  from doc2atom_jax.eval import quick
  from doc2atom_jax.train import data as data_lib
  from doc2atom_jax.train import trainer

  if workdir is None:
    raise UserError("set --workdir: training writes checkpoints and metrics there")
  fileio.writable_dir(workdir, "--workdir")
  heldout = data_lib.heldout_documents(config, config.eval.documents) if config.eval.documents else []
  system, history, run_meta, untrained = fit(config, workdir, heldout=heldout)
  finished = not history or history[-1]["step"] == config.train.steps  # not preempted
  abstention = None
  if finished and system.method.method == "doc2atom" and system.method.abstain == "evidence":
    abstention = _calibrate(config, system)
  if finished and distributed.is_main_process():  # files are process 0's; the others evaluate alike and wait
    from doc2atom_jax import checkpoint

    meta = {"run": run_meta, "step": config.train.steps, "model": system.model.name}
    if abstention is not None:
      meta["abstention"] = abstention
    path = checkpoint.export_params((system.compiler, system.router), checkpoint.export_dir(workdir), meta)
    print(f"exported the trained compiler and router to {path} (use --config.params={path})")
  if finished and heldout:
    results = quick.evaluate(system, heldout, max_new_tokens=config.eval.max_new_tokens, progress="held-out eval")
    check = quick.learning_check(results, untrained, config.eval.margin)
  if finished and heldout and distributed.is_main_process():
    fileio.atomic_write_text(workdir / "results.json", json.dumps(
        {"methods": results, "untrained": untrained, "learning_check": check}, indent=1))
    print(f"held-out evaluation ({len(heldout)} validation documents; kl: top-16 KL to the in-context teacher "
          "on the answer tokens, nll: of the gold answer, both nats/token, lower is better; tf_em: teacher-forced "
          "exact match after the answer prefix; f1/em: greedy answers):\n"
          f"{quick.format_table(results)}\n\nlearning check:\n{quick.format_check(check)}")
  summary = trainer.summary_line(trainer.run_trajectory(workdir, history))  # the whole run's, resumes included
  if summary:
    print(summary)
  return history


def fit(config, workdir: pathlib.Path, *, heldout=()):
  """Trains the config's compiler and router in `workdir` (resuming its checkpoints), the untrained compiler
  scored first on `heldout` and, every train.eval_every steps, the current one: (system, this process's logged
  metrics, the run's identity as checkpoints record it, the untrained compiler's results or None).
  mode=train and the ablations (eval/ablation.py) train through here."""
  import jax

  from doc2atom_jax import distributed, parallel
  from doc2atom_jax.atoms import pipeline
  from doc2atom_jax.eval import quick
  from doc2atom_jax.train import data as data_lib
  from doc2atom_jax.train import step as step_lib
  from doc2atom_jax.train import trainer

  # Bad plans and meshes fail before the model loads; a batch the batch axes do not split is padded.
  rules = parallel.rules_for(config.sharding.plan, config.sharding.rules)
  data_lib.documents_per_process(config.data.documents_per_step, jax.process_count())  # each process: a share
  mesh = dict(zip(parallel.MESH_AXES, parallel.mesh_sizes(config.train.mesh, jax.device_count())))
  num_questions = parallel.padded_batch(config.data.documents_per_step * config.data.questions_per_document, mesh,
                                        rules)
  system = build_system(config)
  tcfg = trainer.TrainConfig(**{**config.train.to_dict(), "mesh": tuple(config.train.mesh), "rules": rules})
  loss_cfg = step_lib.loss_config(config)
  # Each process builds its share of a step's documents; process 0 prepares a TFDS corpus first (a shared disk).
  documents_for_step = distributed.main_first(lambda: data_lib.source_from_config(
      config, tokenizer=system.model.tokenizer, process_index=jax.process_index(), process_count=jax.process_count()))
  # What must match for a checkpoint to be resumed: everything but the step budget and the mode.
  # The sharding plan changes where numbers live, not what they are: resuming on another plan is allowed.
  run_meta = {k: v for k, v in config.to_dict().items()
              if k not in ("mode", "params", "generate", "compile", "ask", "eval", "selfgen", "export", "sharding",
                           "plan", "distributed")}
  run_meta["train"] = {k: v for k, v in run_meta["train"].items()
                       if k not in ("steps", "allow_config_change", "eval_every", "state_cache")}
  run_meta = trainer.comparable_meta(run_meta)
  run_meta = json.loads(json.dumps(run_meta, default=list))
  from doc2atom_jax import checkpoint

  if not checkpoint.checkpoint_steps(checkpoint.checkpoints_dir(workdir)):  # a fresh run, not a resume
    _pretrain_routing(config, system)
  untrained = _untrained_results(system, heldout, workdir, run_meta) if heldout else None

  def periodic_eval(compiler, router):  # held-out KL and routing on the documents the final check uses
    current = pipeline.AtomSystem(system.model, compiler, router, system.method)
    r = quick.evaluate(current, heldout, generate=False, controls=False, baselines=False)["doc2atom"]
    return {"kl": r["kl"], "nll": r["nll"], "route_top1": r["route_top1"]}

  def training_documents(step):  # in the units the method compiles at evaluation (d2l: its chunks)
    return data_lib.method_units(documents_for_step(step, system.model.tokenizer), config.atoms.method, system.split)

  history = trainer.train(system, training_documents, tcfg, loss_cfg,
                          workdir, run_meta=run_meta, eval_fn=periodic_eval if heldout else None,
                          num_questions=num_questions)
  return system, history, run_meta, untrained


MODES["train"] = train


def _pretrain_routing(config, system) -> None:
  """Routing pre-training (config `route_pretrain`) on synthetic training worlds the end-to-end run never reads
  (indices from `data.ROUTE_PRETRAIN_START`); their frozen features are cached on disk. doc2atom only."""
  from doc2atom_jax.train import data as data_lib
  from doc2atom_jax.train import route_pretrain

  rp = config.get("route_pretrain")
  if rp is None or not rp.steps or system.method.method != "doc2atom":
    return
  if config.data.source not in ("tfds", "generator"):
    print(f"routing pre-training skipped: it reads synthetic worlds, and data.source is {config.data.source}")
    return
  source = data_lib.SyntheticSource(seed=config.seed, facts_per_document=tuple(rp.facts_per_document),
                                    questions_per_document=config.data.questions_per_document)
  documents = [data_lib.to_train_document(source.document(data_lib.ROUTE_PRETRAIN_START + i), system.model.tokenizer)
               for i in range(rp.documents)]
  features = route_pretrain.collect(system, documents, route_pretrain.FeatureCache.for_system(system),
                                    progress="routing features")
  history = route_pretrain.pretrain(system, features, steps=rp.steps, documents_per_step=rp.documents_per_step,
                                    learning_rate=rp.learning_rate, seed=config.seed, log_every=rp.steps)
  print(f"routing pre-training: {rp.steps} steps on {len(features)} worlds of {rp.facts_per_document[0]}-"
        f"{rp.facts_per_document[1]} facts; training precision@1 {history[-1]['p_at_1_document']:.3f}")


def _calibrate(config, system) -> dict:
  """Calibrates the evidence abstention's margin on validation worlds the held-out evaluation never uses, sets it
  on `system` and returns what the export records."""
  import dataclasses

  from doc2atom_jax.eval import quick
  from doc2atom_jax.train import data as data_lib

  target = float(config.atoms.get("abstain_false_refusal", 0.02))
  errors.at_least("atoms.abstain_false_refusal", target, 0)
  count = int(config.eval.get("calibration_documents", 16))
  found = quick.calibrate_abstention(system, data_lib.heldout_documents(config, count, data_lib.CALIBRATION_START),
                                     target)
  system.method = dataclasses.replace(system.method, abstain_margin=found["margin"])
  print(f"abstention: margin {found['margin']:.3f} refuses {target:.0%} of the answerable questions the lexical "
        f"check lets through ({found['questions']} questions, {found['documents']} validation worlds)")
  return found


def _untrained_results(system, documents, workdir: pathlib.Path, run_meta: dict) -> dict:
  """The held-out evaluation of the compiler as initialized (no generation), kept in the workdir for resumes."""
  from doc2atom_jax.eval import quick

  path = workdir / "untrained.json"
  if path.exists():
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("run") == run_meta and saved.get("documents") == len(documents) and saved.get("version") == 2:
      return saved["results"]
  results = quick.evaluate(system, documents, generate=False, controls=False, baselines=False,
                           progress="untrained eval")
  print(f"untrained compiler: held-out KL to the teacher {results['doc2atom']['kl']:.3f} "
        f"({len(documents)} validation documents)")
  from doc2atom_jax import distributed

  if distributed.is_main_process():
    workdir.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(path, json.dumps({"run": run_meta, "documents": len(documents), "version": 2,
                                              "results": results}))
  return results


def evaluate(config, workdir: pathlib.Path | None) -> pathlib.Path:
  """Every configured method on the same questions -> the report folder, <workdir>/eval (DESIGN §8)."""
  from doc2atom_jax.eval import runner

  return runner.run(config, workdir)


MODES["eval"] = evaluate


def selfgen(config, workdir: pathlib.Path | None):
  """The base model's greedy answers to QA questions, document in the prompt, as training targets (sharded)."""
  from doc2atom_jax.data import selfgen as selfgen_lib

  return selfgen_lib.main(config, workdir, lambda: load_model(config))


MODES["selfgen"] = selfgen


# ---------------------------------------------------------------------------------------------------------
# export: a params-only export (from an export or a training checkpoint), and one question's adapter as PEFT.
# ---------------------------------------------------------------------------------------------------------
def export(config, workdir: pathlib.Path | None) -> dict:
  """The trained compiler and router as a params-only Orbax export (`eval`, `ask`, `compile` load it with
  --config.params, no training workdir needed), from an export or the newest training checkpoint; with
  `export.question`, also that question's composed adapter (the atoms and weights `ask` would use) in Hugging
  Face PEFT's LoRA layout. Returns {"params": folder or None, "peft": folder or None, "atoms": [...]}."""
  from doc2atom_jax import checkpoint
  from doc2atom_jax.atoms import pipeline

  e = config.export
  checkpoint.storage_dtype(e.dtype)
  # Everything that can be checked without the model, first.
  question = e.question.strip()
  document = fileio.read_text(e.document_file) if e.document_file else e.document
  if e.bank and document:
    raise UserError("set export.bank or export.document (or document_file), not both: the adapter is composed "
                    "from one bank or one document")
  if question and not (e.bank or document):
    raise UserError("export.question needs atoms to compose: set --config.export.bank=<bank folder> (made by "
                    'mode=compile) or --config.export.document="<text>" (compiled on the fly)')
  if not question and (e.bank or document or e.peft_output):
    raise UserError('the PEFT adapter is one question\'s composition: set --config.export.question="..." '
                    "(or leave export.bank, export.document and export.peft_output empty)")
  if document and not document.strip():
    raise UserError("export.document is empty")
  kind, source, step = _export_source(config, workdir)
  output = pathlib.Path(e.output).expanduser() if e.output else (checkpoint.export_dir(workdir) if workdir else None)
  if output is None:
    raise UserError("set --workdir (the export goes to <workdir>/export) or --config.export.output")
  write_params = True
  if output.absolute().resolve() == source.absolute().resolve() or source.absolute().resolve() in (
      output.absolute().resolve().parents):
    if kind == "export" and export_meta(source).get("dtype", "float32") == e.dtype:
      write_params = False  # it is already this export: nothing to rewrite
    else:
      raise UserError(f"the export would overwrite its own source {source}: set --config.export.output to "
                      "another folder")
  peft_folder = None
  if question:
    peft_folder = pathlib.Path(e.peft_output).expanduser() if e.peft_output else (
        workdir / "peft" / _slug(question) if workdir else None)
    if peft_folder is None:
      raise UserError("set --workdir (the PEFT adapter goes to <workdir>/peft/<question>) or "
                      "--config.export.peft_output")
    fileio.writable_dir(peft_folder, "the PEFT adapter folder")
  if write_params:
    fileio.writable_dir(output, "the export folder")
  if e.bank:
    from doc2atom_jax.atoms import bank as bank_lib

    _check_doc_id(bank_lib.info(e.bank), e.doc_id, "export.doc_id")  # no bank: fails before the model loads

  # The trained parameters.
  model = load_model(config)
  if kind == "export":
    system = build_system(config, model=model, params=str(source))
    meta = {k: v for k, v in export_meta(source).items() if k != "dtype"}
  else:
    system = build_system(config, model=model, params="")
    meta = checkpoint.load_checkpoint_params((system.compiler, system.router), source, step)
    where = source / str(meta["step"])
    check_trained(meta, f"the training checkpoint {where}", model.name, config.atoms.method)
    print(f"loaded the compiler and router of training checkpoint {where} (step {meta['step']})")
  meta = {**meta, "model": meta.get("model") or model.name,
          "source": str(source if kind == "export" else source / str(meta["step"]))}

  # The question's composition, before anything is written (a bank of another compiler fails here).
  if question:
    from doc2atom_jax.atoms import bank as bank_lib

    if e.bank:
      bank = bank_lib.load(e.bank, fingerprint=system.fingerprint)
    else:
      from doc2atom_jax.eval import quick

      compiled = system.compile_document(document, e.doc_id or "document")
      bank = quick.in_memory_bank([compiled], code_dtype=config.atoms.code_dtype,  # as compile -> ask sees it
                                  key_dtype=config.atoms.get("key_dtype", "float32"), shared_tail=system.cfg.copy_dim)
    doc_id = (e.doc_id or "document") if document else (e.doc_id or None)
    indices, weights, abstain = system.select(bank, [question], doc_id)
    adapter = system.adapter(bank, indices, weights)
    used = pipeline.atoms_used(bank, indices[0], weights[0])

  result = {"params": None, "peft": None, "atoms": []}
  if write_params:
    result["params"] = checkpoint.export_params((system.compiler, system.router), output, meta, dtype=e.dtype)
    print(f"exported the compiler and router ({e.dtype}, step {meta.get('step')}) to {result['params']} "
          f"(use --config.params={result['params']})")
  else:
    print(f"{source} is already a {e.dtype} export of these parameters; not rewritten")
  if question:
    from doc2atom_jax import peft_export

    folder = peft_export.write_peft_adapter(peft_folder, adapter, model.config,
                                            base_model_name_or_path=_hf_base(model.name))
    fileio.atomic_write_text(folder / "doc2atom_composition.json", json.dumps(
        {"question": question, "abstained": bool(abstain[0]), "atoms": used, "method": config.atoms.method,
         "bank": str(e.bank) if e.bank else None, "doc_id": doc_id, "params": meta["source"],
         "step": meta.get("step"), "model": model.name, "fingerprint": system.fingerprint}, indent=1) + "\n")
    peft_config = json.loads(fileio.read_text(folder / peft_export.CONFIG_NAME))
    print(f"Q: {question}" + ("  (abstained: the null atom ranked first; the adapter is the default adapter plus "
                              "this composition, as ask would apply it before answering 'unknown')"
                              if abstain[0] else ""))
    _print_atoms(used)
    print(f"wrote the composed adapter in PEFT's LoRA layout (r={peft_config['r']}, "
          f"lora_alpha={peft_config['lora_alpha']}, {', '.join(peft_config['target_modules'])}) to {folder}")
    result.update(peft=folder, atoms=used, abstained=bool(abstain[0]))
  return result


MODES["export"] = export


def _export_source(config, workdir: pathlib.Path | None) -> tuple[str, pathlib.Path, int | None]:
  """("export", folder, None) or ("checkpoint", checkpoints folder, step or None = the newest) for
  `export.source`, else `config.params`, else <workdir>/checkpoints."""
  from doc2atom_jax import checkpoint

  if config.export.source:
    path = pathlib.Path(config.export.source).expanduser()
    if checkpoint.is_export(path):
      return "export", path, None
    if checkpoint.is_checkpoint_step(path):  # one checkpoint: <workdir>/checkpoints/<step>
      return "checkpoint", path.parent, int(path.name)
    for folder in (path, checkpoint.checkpoints_dir(path)):  # a checkpoints folder, or a training workdir
      if checkpoint.checkpoint_steps(folder):
        return "checkpoint", folder, None
    raise UserError(f"export.source {path}: no parameter export ({checkpoint.PARAMS}/ and {checkpoint.META_FILE}) "
                    "and no training checkpoint there (give an export, a checkpoints folder or a training workdir)")
  if config.params:
    return "export", pathlib.Path(config.params).expanduser(), None
  folder = checkpoint.checkpoints_dir(workdir) if workdir is not None else None
  if folder is not None and checkpoint.checkpoint_steps(folder):
    return "checkpoint", folder, None
  where = f"no training checkpoint under {folder}" if folder is not None else "no --workdir"
  raise UserError(f"nothing to export ({where}, no --config.params): set --config.export.source=<an export, a "
                  "checkpoints folder or a training workdir>, or --workdir of a training run")


def _slug(text: str, limit: int = 60) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower())[:limit].strip("-") or "question"


def _hf_base(model_name: str) -> str:
  """What PEFT's base_model_name_or_path should name: the model's Hugging Face folder where it has one."""
  from doc2atom_jax.models import base

  if model_name.startswith("hf:"):
    return str(pathlib.Path(model_name[3:]).expanduser().absolute())
  if model_name in base.BUNDLED:
    return str(base.bundled_folder(model_name))
  return model_name


def plan(config, workdir: pathlib.Path | None) -> dict:
  """Per-chip memory of this config's training under its sharding plan, from shapes alone (doc2atom_jax/plan.py)."""
  from doc2atom_jax import plan as plan_lib

  return plan_lib.main(config, workdir)


MODES["plan"] = plan


def bench(config, workdir: pathlib.Path | None) -> dict:
  """The performance benchmark (doc2atom_jax/bench.py) of a config with a `bench` section (configs/bench.py)."""
  from doc2atom_jax import bench as bench_lib

  return bench_lib.job(config, workdir)


MODES["bench"] = bench
