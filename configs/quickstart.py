"""The embedded default, the main job: the bundled SmolLM2-135M-Instruct learns to compile invented documents.

Run (train -> held-out evaluation with the learning check -> params-only Orbax export; ~19 min on 2 cores cold, ~13 warm):
  python -m doc2atom_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
The Doc-to-LoRA baselines, same budget: --config=configs/quickstart.py:d2l (or :d2l_atom).
Documents -> an atom bank with the trained compiler, then a question against it:
  python -m doc2atom_jax.main --config=configs/quickstart.py --config.mode=compile \
      --config.params=runs/quickstart/export --config.compile.input=docs.jsonl --workdir=runs/quickstart
  python -m doc2atom_jax.main --config=configs/quickstart.py --config.mode=ask --config.params=runs/quickstart/export \
      --config.ask.bank=runs/quickstart/banks/docs --config.ask.question="Who founded the Orlen Observatory?"
A bfloat16 params export of a run's newest checkpoint, and one question's adapter as PEFT LoRA:
  python -m doc2atom_jax.main --config=configs/quickstart.py --config.mode=export --workdir=runs/quickstart \
      --config.export.output=runs/quickstart/export_bf16 --config.export.dtype=bfloat16 \
      --config.export.document_file=my_doc.txt --config.export.question="Who founded the Orlen Observatory?"
The in_context baseline on a document of your own:
  python -m doc2atom_jax.main --config=configs/quickstart.py --config.mode=generate --config.generate.question="When was it founded?"
Per-chip memory of a config's training under its sharding plan, for chips this machine does not have (shapes only):
  python -m doc2atom_jax.main --config=configs/gemma2_2b_it.py --config.mode=plan --config.plan.devices=256
Override any field, e.g. --config.model.name=tiny-random-llama, --config.train.steps=300.
"""

import ml_collections

from configs import variants

DOCUMENT = (
    "The Orlen Observatory was founded in 1871 by the astronomer Maria Delvane. It stands on a basalt ridge "
    "above the fishing town of Kestrava. Its great refractor, nicknamed Old Lantern, has a lens 61 centimetres "
    "across. In 1904 the director Tomas Ebrel discovered a comet from the observatory."
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "train"  # train (the main job) | eval | generate | compile | ask | export | selfgen | plan
  c.seed = 0
  c.params = ""  # a trained compiler + router (<workdir>/export of mode=train) for compile and ask

  c.model = ml_collections.ConfigDict()
  c.model.name = "smollm2-135m-instruct"  # or gemma3-270m, hf:<folder>, tiny-random-<family>
  c.model.dtype = "float32"  # compute dtype: float32 on CPU (no bf16 units), bfloat16 on accelerators
  c.model.scan_layers = False
  c.model.attention_block = 512  # passes over more tokens attend in causal blocks of this many queries; 0 = dense
  c.model.remat = "none"  # none | full | dots: recompute each base-model layer in the backward pass (memory)

  # Multi-process (multi-host) jobs (doc2atom_jax/distributed.py); one process needs none of this.
  # DOC2ATOM_DISTRIBUTED=1 / 0 in the environment forces initialize on / off.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = "auto"  # auto (a SLURM/TPU-pod/MPI job or JAX_COORDINATOR_ADDRESS) | on | off
  c.distributed.coordinator_address = ""  # host:port of process 0; "" = JAX_COORDINATOR_ADDRESS or detected
  c.distributed.num_processes = 0  # 0 = detected from the cluster environment
  c.distributed.process_id = -1  # -1 = detected from the cluster environment
  c.distributed.local_device_ids = ()  # () = every local device
  c.distributed.timeout_s = 300  # waiting for the coordinator and the other processes; then one clear error

  # mode=generate: the document and the question in the prompt (the `in_context` baseline).
  c.generate = ml_collections.ConfigDict()
  c.generate.document = DOCUMENT
  c.generate.document_file = ""  # a UTF-8 text file; replaces `document` when set
  c.generate.questions = ("Who founded the Orlen Observatory?", "In which year was the Orlen Observatory founded?",
                          "Above which town does the observatory stand?")
  c.generate.question = ""  # a single question; replaces `questions` when set
  c.generate.answer_prefix = ""  # the start of the answer, prefilled for every question ("" = none); the answer
  #                                is then what follows it, up to the end of the sentence
  c.generate.max_new_tokens = 24
  c.generate.temperature = 0.0  # 0 = greedy
  c.generate.top_p = 1.0
  c.generate.truncation = "error"  # or "left": keep the end of prompts that exceed the context

  # The atom system (DESIGN §2): method, atomizer, routing.
  c.atoms = ml_collections.ConfigDict()
  c.atoms.method = "doc2atom"  # doc2atom | d2l (chunks, no router) | d2l_atom (atoms, no router)
  c.atoms.min_atom_tokens = 4
  c.atoms.max_atom_tokens = 48
  c.atoms.chunk_tokens = 0  # d2l: tokens per chunk; 0 = the whole document
  c.atoms.k = 4
  c.atoms.normalization = "softmax"  # softmax | sigmoid | softmax_k
  c.atoms.route_approx = False  # answer-time top-k by jax.lax.approx_max_k (approximate on TPU; exact on CPU/GPU)
  # Answer-time routing (atoms/fusion.py): fused = the router's scores + BM25 over atom words + the question's
  # answer type (docs/method.md has the measured precision of each ingredient); dense = the router alone.
  c.atoms.route_score = "fused"
  # Fused routing's second hop: names = the names a bridge atom adds find a two-hop question's answer atom, placed
  # after the first atom (which never moves); off = the first hop's order (docs/method.md §3 has both).
  c.atoms.second_hop = "names"
  # evidence: refuse a question naming what the document never mentions, or with nothing of its answer type
  # about it, or whose best atom's dense margin over the null is below the margin mode=train calibrates and
  # stores in the export (an export without one: the lexical checks only); null: v1 (the null atom ranks first).
  c.atoms.abstain = "evidence"
  # The calibration's target: this share of the answerable questions the lexical checks let through is refused
  # (0 = no margin). 5% refused 10-16% of answerable questions on other worlds (docs/method.md), so 2%.
  c.atoms.abstain_false_refusal = 0.02
  c.atoms.max_chunk_tokens = 0  # encode long documents in chunks of this many tokens; 0 = the model's context
  c.atoms.code_dtype = "bfloat16"  # storage of codes in banks: bfloat16 | float32 | int8 (absmax per atom and layer)
  c.atoms.key_dtype = "float32"  # storage of routing keys in banks: float32 | bfloat16
  # d2l / d2l_atom training: gather (per question) | grouped (ragged_dot, per document) | auto (grouped off CPU)
  c.atoms.compose_form = "auto"

  # The compiler (hypernetwork) and router; CPU-sized trunk.
  c.compiler = ml_collections.ConfigDict()
  c.compiler.targets = ("down",)
  c.compiler.rank = 1  # 8 for d2l
  c.compiler.code_dim = 640  # 64 trunk entries + the copy path's 576
  c.compiler.width = 256
  c.compiler.num_blocks = 2
  c.compiler.num_heads = 4
  c.compiler.key_dim = 128
  c.compiler.default_rank = 2
  c.compiler.alpha = 2.0
  # The copy path (atoms/compiler.py): code entries that carry the span's copied token embeddings, which the
  # head writes straight into the residual stream. Without it (0) the learning check's control (2) failed;
  # gains are stored /copy_gain_scale so that they move ~copy_gain_scale*lr a step (10 was too slow at 100 steps).
  # All 576 directions of SmolLM2's embedding (a lossless basis): with 128 (67% of the energy) the copied vector
  # pushed many tokens alike; 576 halved the held-out NLL gap and doubled exact match (docs/method.md §6).
  c.compiler.copy_dim = 576
  c.compiler.copy_gain_scale = 40.0
  c.compiler.shared_head = False  # True: one code -> (A, B) map for every layer instead of one per layer
  # Keys and queries: a linear path from the centred frozen features beside their MLPs (which start at 0), so
  # the router starts as the frozen model's centred cosine; False = the MLPs alone (exports made before it).
  c.compiler.route_skip = True

  # mode=train: distillation on synthetic fact worlds (DESIGN §2.7).
  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 20
  # After warmup: constant | cosine (decay to 10% of learning_rate). Constant, measured on 24 validation worlds
  # (docs/method.md §6, ablation constant_lr): held-out NLL 2.36 -> 2.21 and tf_em 0.155 -> 0.190 with our
  # templates, 3.02 -> 2.86 and 0.071 -> 0.131 with held-out ones: in 100 steps the decay comes too early.
  c.train.schedule = "constant"
  c.train.weight_decay = 0.01
  c.train.clip_norm = 1.0
  c.train.accumulate = 1
  c.train.checkpoint_every = 25
  c.train.keep_checkpoints = 3
  c.train.max_nonfinite = 5
  c.train.mesh = (-1, 1, 1)  # (data, fsdp, tensor); -1 = the remaining devices
  c.train.allow_config_change = False
  c.train.eval_every = 25  # held-out KL and routing top-1 on the eval documents every this many steps; 0 = off
  # Cache each training document's frozen layer states on disk (train/state_cache.py; ~5.6 MB per world
  # of 4-8 facts here): for runs that revisit a corpus (sweeps, ablations); the main job sees each document once.
  c.train.state_cache = False
  # How parameters, optimizer state, batches and banks lie on train.mesh (doc2atom_jax/parallel.py PLANS):
  # dp (replicated weights), fsdp (weights + Adam split over fsdp), fsdp_tp (+ tensor parallel; the default).
  # The layout never changes the numbers, so it is not part of a checkpoint's identity: resume on another plan.
  c.sharding = ml_collections.ConfigDict()
  c.sharding.plan = "fsdp_tp"
  c.sharding.rules = ()  # overrides, e.g. (("atoms", ("data", "fsdp", "tensor")), ("mlp", None))
  # Routing pre-training (train/route_pretrain.py), before the first end-to-end step of a fresh run: the keys
  # and the router on cached frozen features of synthetic training worlds larger than the end-to-end ones,
  # several documents a step (docs/method.md: the end-to-end router alone was noise at 64 facts). 0 steps = off.
  c.route_pretrain = ml_collections.ConfigDict()
  c.route_pretrain.steps = 300
  c.route_pretrain.documents = 64
  c.route_pretrain.facts_per_document = (4, 32)
  c.route_pretrain.documents_per_step = 4
  c.route_pretrain.learning_rate = 1e-3
  c.loss = ml_collections.ConfigDict()
  c.loss.kd, c.loss.ce, c.loss.route, c.loss.atom, c.loss.null = 1.0, 1.0, 1.0, 1.0, 1.0
  c.loss.kd_tokens = "right"  # distil the teacher only where its top-1 is the gold ("all": every token, v1)
  c.loss.atom_target = "gold"  # the oracle-routed student learns the gold ("teacher": the evidence teacher, v1)
  c.loss.type, c.loss.l1, c.loss.orth = 0.1, 0.1, 0.01
  c.loss.vocab_chunk = 0  # >0: student log-probs over the vocabulary in chunks of this many ids (no [B, A, V] logits)
  c.data = ml_collections.ConfigDict()
  # tfds: synthetic array_record corpus read through tfds.data_source + grain; generator: synthetic, by index;
  # qa: qa_files + self_gen prepared as a LocalQAJsonl dataset, read like tfds (doc2atom_jax/train/data.py).
  c.data.source = "tfds"
  c.data.data_dir = ""  # where the TFDS corpora are prepared; default <cache>/tfds
  c.data.train_documents = 2000  # the synthetic corpus size; steps beyond it start a new, reshuffled epoch
  c.data.documents_per_step = 1
  c.data.facts_per_document = (4, 8)  # synthetic training without a curriculum, and held-out documents
  c.data.questions_per_document = 8  # real QA documents with more get a seeded sample per step
  c.data.curriculum = ()  # ((start_step, (min_facts, max_facts)), ...) from step 0; () = off
  # qa: JSONL paths or globs (e.g. selfgen's shard-*.jsonl), bundled samples or qa.load_source names, each with
  # an optional @split: ("squad@dev", "tfds:squad/v1.1@train", "runs/sg/selfgen/shard-*.jsonl").
  c.data.qa_files = ()
  c.data.self_gen = ()  # qa: Doc-to-LoRA's released self-generated QA (qa.read_self_gen): files, folders, globs
  c.data.on_error = "raise"  # a malformed QA JSONL line: raise (file, line, field) | skip (counts printed)

  # After training: a quick evaluation on held-out (validation-split) synthetic documents.
  c.eval = ml_collections.ConfigDict()
  c.eval.documents = 4  # 0 skips it
  c.eval.max_new_tokens = 12  # answer budget (greedy), here and in mode=eval
  c.eval.margin = 0.05  # the learning check: doc2atom's KL must beat each control by this many nats/token
  c.eval.calibration_documents = 16  # validation worlds (never the held-out ones) that calibrate abstention
  # mode=eval (doc2atom_jax/eval/runner.py): methods side by side -> <workdir>/eval/{report.md, results.json, *.png}.
  # The defaults are a quick look (8-9 minutes on 2 CPU cores); raise the caps for a real measurement.
  c.eval.methods = ()  # () = every method that can run: no_context, in_context, in_context_trunc, rag_atoms,
  #                      doc2atom, doc2atom_oracle, and d2l / d2l_atom where `exports` gives theirs
  c.eval.exports = ()  # separately trained baselines: ("d2l=runs/d2l/export", "d2l_atom=runs/d2l_atom/export")
  c.eval.datasets = ()  # () = synthetic_unseen, synthetic_seen and every bundled QA sample; or qa.load_source names
  c.eval.max_questions = 3  # per QA dataset (whole documents in file order, the last one cut); 0 = all
  c.eval.synthetic_documents = 2  # unseen worlds per facts size; seen worlds: this many x len(facts_per_document)
  c.eval.facts_per_document = (4, 8, 16)  # unseen worlds' sizes: the interference curve's points
  c.eval.max_doc_tokens = 1024  # longer documents are skipped and counted in the report, never cut
  c.eval.trunc_tokens = 256  # in_context_trunc keeps the document's first this many tokens
  c.eval.batch_size = 8  # questions per forward / generate call (padded to a power of two)
  c.eval.scan_layers = True  # run the base model's layers as a scan here: ~6x faster compiles, same numbers
  c.eval.latency_lengths = (128, 512, 1024)  # document tokens at which latency is measured
  c.eval.cost_repeats = 2  # timed repetitions (after a warm-up) per latency measurement; the median is kept
  c.eval.cost_new_tokens = 16  # generated tokens per timed answer (stop tokens ignored)
  c.eval.output = ""  # default <workdir>/eval
  # The capacity oracle (methods capacity_atom, capacity_doc): free LoRAs fitted against the teacher on each
  # batch of questions, per atom (oracle routing) and per document; ~3 s an Adam step on 2 CPU cores for 8
  # SmolLM2 questions, so 30 steps add ~3 minutes per batch and method. 0 = off.
  c.eval.capacity_steps = 0
  c.eval.capacity_rank = 1  # per atom
  c.eval.capacity_doc_rank = 8  # per document (Doc-to-LoRA's rank)
  c.eval.capacity_learning_rate = 5e-3

  # mode=compile: a JSONL of documents ({"doc_id"|"id", "text"|"context"} per line) -> an atom bank.
  c.compile = ml_collections.ConfigDict()
  c.compile.input = ""
  c.compile.bank = ""  # default: <workdir>/banks/<input file stem>

  # mode=ask: a question against a bank -> the answer and the atoms used (with their text spans).
  c.ask = ml_collections.ConfigDict()
  c.ask.bank = ""
  c.ask.question = ""
  c.ask.answer_prefix = ""  # the start of the answer, prefilled ("The observatory was founded in"); "" = none
  c.ask.doc_id = ""  # d2l / d2l_atom compose one document's adapters: which one
  c.ask.max_new_tokens = 24

  # mode=export: the trained compiler and router as a params-only Orbax export (no optimizer state) that eval,
  # compile and ask load with --config.params, no training workdir needed; with `question`, also that
  # question's composed adapter (the atoms and weights ask would use) in Hugging Face PEFT's LoRA layout.
  c.export = ml_collections.ConfigDict()
  c.export.source = ""  # an export, a checkpoints folder (newest step) or one <step> folder, or a training workdir;
  #                       "" = `params` if set, else the newest checkpoint under <workdir>/checkpoints
  c.export.output = ""  # default <workdir>/export; never the source itself (unless already that export)
  c.export.dtype = "float32"  # float32 | bfloat16: storage of the parameters (loading casts back to float32)
  c.export.question = ""  # set: also export this question's composed adapter as PEFT LoRA
  c.export.bank = ""  # route over this bank (made by mode=compile with the same parameters) ...
  c.export.document = ""  # ... or over this text, compiled on the fly
  c.export.document_file = ""  # a UTF-8 text file; replaces `document` when set
  c.export.doc_id = ""  # d2l / d2l_atom compose one document's adapters: which one of the bank
  c.export.peft_output = ""  # default <workdir>/peft/<the question, slugged>; replaced if it exists

  # mode=selfgen: the base model's greedy answers (document in the prompt) as training targets, sharded and
  # resumable (doc2atom_jax/data/selfgen.py).
  c.selfgen = ml_collections.ConfigDict()
  c.selfgen.input = ""  # a QA JSONL in the project schema; or set `source`
  c.selfgen.source = ""  # a qa.load_source name (squad, tfds:squad/v1.1, ...)
  c.selfgen.split = ""  # of `source`; default its evaluation split
  c.selfgen.limit = 0  # the first N questions; 0 = all
  c.selfgen.on_error = "raise"  # a malformed line of `input`: raise | skip (counted in a warning)
  c.selfgen.output = ""  # default <workdir>/selfgen
  c.selfgen.num_shards = 0  # 0 = jax.process_count()
  c.selfgen.shard = -1  # -1 = this process's shards (i % process_count == process_index)
  c.selfgen.max_new_tokens = 32
  c.selfgen.batch_size = 16  # most questions of one document per generate call
  c.selfgen.documents_per_part = 16  # the unit of resumption
  c.selfgen.on_long = "error"  # a document too long for the context: error | skip (counted)

  # mode=plan: per-chip memory of this config's training under its sharding plan, from shapes alone (no weights
  # are read, nothing is allocated), for chips this machine need not have (doc2atom_jax/plan.py).
  c.plan = ml_collections.ConfigDict()
  c.plan.mesh = ()  # (data, fsdp, tensor) to plan for; () = `devices` chips laid out as train.mesh says
  c.plan.devices = 0  # chips; 0 = this machine's device count
  c.plan.device_memory_gb = 16.0  # per chip: 16 TPU v5e, 32 v4, 80 H100 / A100-80GB, 141 H200
  c.plan.bank_atoms = 1_000_000  # an atom bank of this many atoms, sharded over the `atoms` rule's axes
  # The activation estimate's lengths (a run's real lengths are known only once its data is read).
  c.plan.doc_tokens = 512
  c.plan.atoms_per_document = 32
  c.plan.question_tokens = 64  # the question-only prompt (router features)
  c.plan.student_tokens = 96  # question prompt + answer (the student passes)
  c.plan.answer_tokens = 16

  variants.apply(c, arg)  # --config=configs/quickstart.py:d2l (or :d2l_atom) trains a baseline instead
  c.lock()
  return c
