"""mode=export on a tiny random model: a params-only export from a training checkpoint (float32 and bfloat16)
that the project loads back to the same numbers, one question's composed adapter in PEFT's LoRA layout, and
one clear error for each kind of bad input."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import tiny
from doc2atom_jax import modes, peft_export
from doc2atom_jax import system as system_lib
from doc2atom_jax.atoms import compose, pipeline
from doc2atom_jax.data import prompts
from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import quick
from doc2atom_jax.models import decoder

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENT = ("The Orlen Observatory was founded in 1871 by the astronomer Maria Delvane. It stands above the town "
            "of Kestrava. Its refractor has a lens 61 centimetres across.")
QUESTION = "Who founded the Orlen Observatory?"


def config(**export):
  """configs/tiny.py, 2 training steps on generator data (no TFDS preparation), checkpoints at steps 1 and 2,
  no held-out evaluation; mode export with `export` overrides."""
  c = tiny.get_config()
  c.unlock()
  c.data.source = "generator"
  c.train.update(dict(steps=2, warmup_steps=1, checkpoint_every=1, eval_every=0))
  c.eval.documents = 0
  c.mode = "export"
  c.export.update(export)
  return c


def with_params(c, path):
  c.params = str(path)
  return c


def params_of(system) -> dict:
  return nnx.to_pure_dict(nnx.state((system.compiler, system.router), nnx.Param))


def leaf_paths(tree) -> set[str]:
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def logits(system, adapter, question=QUESTION):
  """The base model's logits on the question alone (as ask prompts it) with `adapter`."""
  model = system.model
  tokens = jnp.asarray([model.encode(model.chat_prompt(prompts.question_prompt(question)))], jnp.int32)
  return np.asarray(decoder.forward(model.weights, model.config, tokens, adapter=adapter).logits[0])


def composed(system, question=QUESTION):
  """(the adapter ask would compose for `question` against DOCUMENT, the in-memory bank, the selection)."""
  bank = quick.in_memory_bank([system.compile_document(DOCUMENT, "document")], code_dtype="bfloat16")
  idx, w, abstain = system.select(bank, [question], "document")
  return system.adapter(bank, idx, w), bank, (idx, w, abstain)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step mode=train run (its trained modules kept) and a float32 mode=export of its newest checkpoint."""
  workdir = tmp_path_factory.mktemp("run")
  systems = []
  build = system_lib.build_system

  def keep(*args, **kwargs):
    systems.append(build(*args, **kwargs))
    return systems[-1]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(modes, "build_system", keep)
    modes.train(config(), workdir)
  out = modes.export(config(output=str(workdir / "exported")), workdir)  # source: <workdir>/checkpoints
  return workdir, systems[0], out


# ---------------------------------------------------------------------------------------------------------
# The params-only export.
# ---------------------------------------------------------------------------------------------------------
def test_export_of_the_newest_checkpoint_reloads_to_the_trained_modules(trained, tmp_path):
  workdir, system, out = trained
  assert out["params"] == workdir / "exported" and out["peft"] is None
  meta = json.loads((workdir / "exported" / "export.json").read_text())
  assert meta["step"] == 2 and meta["dtype"] == "float32" and meta["model"] == "tiny-random-llama"
  assert meta["source"] == str(workdir / "checkpoints" / "2") and meta["run"]["atoms"]["method"] == "doc2atom"
  # Parameters only: the saved tree is exactly the modules' Params (the checkpoint also holds opt_state).
  saved = ocp.StandardCheckpointer().metadata(workdir / "exported" / "params").item_metadata.tree
  assert leaf_paths(saved) == leaf_paths(params_of(system))

  # Loaded through the project from a copy away from the training workdir (as eval, compile and ask load it).
  elsewhere = shutil.copytree(workdir / "exported", tmp_path / "elsewhere")
  loaded = system_lib.build_system(with_params(config(), elsewhere))
  for got, want in zip(jax.tree.leaves(params_of(loaded)), jax.tree.leaves(params_of(system))):
    np.testing.assert_array_equal(got, want)
  a, b = loaded.compile_document(DOCUMENT, "d"), system.compile_document(DOCUMENT, "d")
  np.testing.assert_array_equal(a.codes, b.codes)
  np.testing.assert_array_equal(a.keys, b.keys)
  np.testing.assert_array_equal(logits(loaded, composed(loaded)[0]), logits(system, composed(system)[0]))
  # mode=train's own export (the same modules, written at the end of the run) holds the same numbers.
  final = system_lib.build_system(with_params(config(), workdir / "export"))
  for got, want in zip(jax.tree.leaves(params_of(final)), jax.tree.leaves(params_of(loaded))):
    np.testing.assert_array_equal(got, want)


def test_export_of_one_checkpoint_step(trained, tmp_path):
  """A preempted run's checkpoint: <workdir>/checkpoints/<step> as the source, step 1 of 2."""
  workdir, system, _ = trained
  out = modes.export(config(source=str(workdir / "checkpoints" / "1"), output=str(tmp_path / "step1")), None)
  assert json.loads((out["params"] / "export.json").read_text())["step"] == 1
  step1 = system_lib.build_system(with_params(config(), out["params"]))
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params_of(step1)),
                                                    jax.tree.leaves(params_of(system)))]
  assert any(moved)  # the second step changed parameters: this is the first step's


def test_bfloat16_export_is_half_the_size_and_reloads_rounded(trained, tmp_path):
  workdir, system, _ = trained
  out = modes.export(config(dtype="bfloat16", output=str(tmp_path / "bf16")), workdir)
  assert json.loads((out["params"] / "export.json").read_text())["dtype"] == "bfloat16"
  size = lambda folder: sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
  ratio = size(out["params"] / "params") / size(workdir / "exported" / "params")
  assert 0.4 < ratio < 0.6, ratio

  loaded = system_lib.build_system(with_params(config(), out["params"]))
  for got, want in zip(jax.tree.leaves(params_of(loaded)), jax.tree.leaves(params_of(system))):
    assert got.dtype == jnp.float32  # cast back on load: eval and ask compute as before
    np.testing.assert_array_equal(got, np.asarray(want).astype(jnp.bfloat16).astype(np.float32))
  # The same question's adapter logits (|logits| <= ~3) within 5e-3 of the float32 parameters' (measured: 4e-4).
  ours, theirs = logits(loaded, composed(loaded)[0]), logits(system, composed(system)[0])
  np.testing.assert_allclose(ours, theirs, atol=5e-3, rtol=0)


def test_reexporting_an_export_in_place_is_a_no_op_or_refused(trained):
  workdir, _, _ = trained
  exported = workdir / "exported"
  before = (exported / "export.json").read_text()
  # The source itself as the output: same dtype -> nothing rewritten; another dtype -> refused.
  out = modes.export(with_params(config(output=str(exported)), exported), None)
  assert out["params"] is None and (exported / "export.json").read_text() == before
  with pytest.raises(UserError, match="overwrite its own source"):
    modes.export(with_params(config(output=str(exported), dtype="bfloat16"), exported), None)
  with pytest.raises(UserError, match="overwrite its own source"):
    modes.export(config(source=str(workdir / "checkpoints"), output=str(workdir / "checkpoints")), None)
  assert (exported / "export.json").read_text() == before


# ---------------------------------------------------------------------------------------------------------
# One question's composed adapter as PEFT LoRA.
# ---------------------------------------------------------------------------------------------------------
def test_peft_adapter_of_a_question_against_a_document(trained, tmp_path, capsys):
  workdir, system, _ = trained
  c = with_params(config(output=str(tmp_path / "params"), question=QUESTION, document=DOCUMENT), workdir / "exported")
  out = modes.export(c, tmp_path)
  folder = tmp_path / "peft" / "who-founded-the-orlen-observatory"
  assert out["peft"] == folder and out["params"] == tmp_path / "params"

  adapter, bank, (idx, w, abstain) = composed(system)
  # The atoms and weights ask would use, printed and recorded.
  assert [u["weight"] for u in out["atoms"]] == pytest.approx([float(x) for x in w[0] if x > 0])
  assert [u["atom"] if u["atom"] == "null" else u["atom"]["index"] for u in out["atoms"]] == [
      "null" if i == compose.NULL_INDEX else bank.atoms[i].index for i, x in zip(idx[0], w[0]) if x > 0]
  printed = capsys.readouterr().out
  assert f"Q: {QUESTION}" in printed and "PEFT's LoRA layout" in printed
  assert ("abstained" in printed) == bool(abstain[0]) == out["abstained"]
  assert printed.count("\n  0.") + printed.count("\n  1.") == len(out["atoms"])
  record = json.loads((folder / "doc2atom_composition.json").read_text())
  assert record["question"] == QUESTION and record["atoms"] == out["atoms"] and record["step"] == 2

  config_json = json.loads((folder / "adapter_config.json").read_text())
  k, rank, default = c.atoms.k, c.compiler.rank, c.compiler.default_rank
  assert config_json["r"] == k * rank + default and config_json["target_modules"] == ["down_proj"]
  assert config_json["lora_alpha"] / config_json["r"] == pytest.approx(c.compiler.alpha)  # PEFT's scaling = ours
  back = peft_export.read_peft_adapter(folder, system.model.config)
  want = logits(system, adapter)
  np.testing.assert_allclose(logits(system, back), want, atol=1e-5, rtol=0)
  assert np.abs(want - logits(system, None)).max() > 1e-2  # the adapter changes the logits (0.14)


@pytest.mark.parametrize("abstains", [True, False])
def test_peft_adapter_with_and_without_abstention(trained, tmp_path, capsys, monkeypatch, abstains):
  """The null atom first (forced) or nowhere (forced): the adapter ask would apply (the default adapter plus the
  composition, null atom included) is exported either way, and the printout says whether it abstained."""
  workdir, system, _ = trained
  select = pipeline.AtomSystem.select

  def forced(self, bank, questions, doc_id=None):
    idx, w, _ = select(self, bank, questions, doc_id)
    idx = np.array(idx)
    if abstains:
      idx[:, 0] = compose.NULL_INDEX
    else:
      idx[idx == compose.NULL_INDEX] = 0
    return idx, w, np.full(len(questions), abstains)

  monkeypatch.setattr(pipeline.AtomSystem, "select", forced)
  c = with_params(config(question=QUESTION, document=DOCUMENT, peft_output=str(tmp_path / "adapter")),
                  workdir / "exported")
  out = modes.export(c, tmp_path)
  assert out["abstained"] == abstains and (out["atoms"][0]["atom"] == "null") == abstains
  assert ("abstained: the null atom ranked first" in capsys.readouterr().out) == abstains
  adapter, _, _ = composed(system)  # through the forced selection too
  back = peft_export.read_peft_adapter(out["peft"], system.model.config)
  np.testing.assert_allclose(logits(system, back), logits(system, adapter), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Bad input: one clear UserError each, nothing written.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,needle", [
    (dict(dtype="float16"), "unknown export dtype 'float16'; valid: float32, bfloat16"),
    (dict(question=QUESTION, bank="some/bank", document=DOCUMENT), "set export.bank or export.document"),
    (dict(question=QUESTION), "export.question needs atoms to compose"),
    (dict(document=DOCUMENT), "set --config.export.question"),
    (dict(source="nowhere"), "export.source nowhere: no parameter export"),
])
def test_bad_export_settings(tmp_path, overrides, needle):
  with pytest.raises(UserError, match=needle):
    modes.export(config(**overrides), tmp_path)
  assert not any(tmp_path.iterdir())


def test_nothing_to_export(tmp_path):
  with pytest.raises(UserError, match="nothing to export .no training checkpoint under .*checkpoints, no --config.params"):
    modes.export(config(), tmp_path)
  with pytest.raises(UserError, match="nothing to export .no --workdir"):
    modes.export(config(), None)


def test_outputs_need_a_workdir_or_a_folder(trained):
  workdir, _, _ = trained
  with pytest.raises(UserError, match="--config.export.output"):
    modes.export(with_params(config(), workdir / "exported"), None)
  with pytest.raises(UserError, match="--config.export.peft_output"):
    modes.export(with_params(config(output="x", question=QUESTION, document=DOCUMENT), workdir / "exported"), None)


def test_a_bank_of_another_compiler_is_refused(trained, tmp_path):
  workdir, _, _ = trained
  docs = tmp_path / "docs.jsonl"
  docs.write_text(json.dumps({"doc_id": "orlen", "text": DOCUMENT}) + "\n")
  c = config()  # the untrained compiler: another fingerprint
  c.compile.input, c.compile.bank = str(docs), str(tmp_path / "bank")
  modes.compile_documents(c, None)
  c = with_params(config(output=str(tmp_path / "out"), question=QUESTION, bank=str(tmp_path / "bank"),
                         peft_output=str(tmp_path / "peft")), workdir / "exported")
  with pytest.raises(UserError, match="made by another model/compiler"):
    modes.export(c, None)
  assert not (tmp_path / "out").exists() and not (tmp_path / "peft").exists()  # checked before writing


def test_the_command_line_reports_one_error_line(tmp_path):
  cmd = [sys.executable, "-m", "doc2atom_jax.main", "--config=configs/tiny.py", "--config.mode=export",
         f"--workdir={tmp_path}"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, XLA_FLAGS=""),
                          timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert [l for l in result.stderr.splitlines() if l.startswith("error:")] == [
      f"error: nothing to export (no training checkpoint under {tmp_path}/checkpoints, no --config.params): set "
      "--config.export.source=<an export, a checkpoints folder or a training workdir>, or --workdir of a training run"]
