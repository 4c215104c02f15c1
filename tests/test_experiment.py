"""The experiment driver (doc2atom_jax/experiment.py): learning-rate selection, resumability, the commands.

No training here: the sweep's results are written by hand as the trainer writes them (`eval.jsonl`), and the
commands are checked by parsing their flags into the real configs.
"""

import ast
import json

import pytest

from configs import smollm2_synthetic
from doc2atom_jax import experiment
from doc2atom_jax.errors import UserError


def write_eval(workdir, rows, cut_last=False):
  workdir.mkdir(parents=True, exist_ok=True)
  text = "\n".join(json.dumps(r) for r in rows)
  if cut_last:
    text += '\n{"step": 50, "kl'  # a stop in the middle of a write
  (workdir / "eval.jsonl").write_text(text + "\n")


def test_heldout_value_reads_the_step_and_ignores_a_cut_line(tmp_path):
  assert experiment.heldout_value(tmp_path, 50) is None
  write_eval(tmp_path, [{"step": 25, "kl": 3.0, "nll": 3.5}, {"step": 50, "kl": 2.5, "nll": 4.0}], cut_last=True)
  assert experiment.SELECT_BY == "nll" and experiment.heldout_value(tmp_path, 50) == 4.0  # v2 selects by NLL
  assert experiment.heldout_value(tmp_path, 25, "kl") == 3.0
  assert experiment.heldout_value(tmp_path, 75) is None


def test_selection_lowest_kl_ties_to_the_smaller_rate():
  assert experiment.select_learning_rate({3e-4: 2.5, 1e-3: 2.2, 3e-3: 2.4}) == 1e-3
  assert experiment.select_learning_rate({3e-4: 2.205, 1e-3: 2.2, 3e-3: 2.4}) == 3e-4  # within 0.01 nats
  assert experiment.select_learning_rate({3e-4: 2.5, 1e-3: None, 3e-3: 2.4}) is None  # the sweep is unfinished


def test_dry_run_prints_the_sweep_then_finals_once_selected(tmp_path, capsys):
  root = tmp_path / "exp"
  experiment.run_stages("all", root, dry_run=True)
  out = capsys.readouterr().out
  sweep_runs = sum(len(experiment.LEARNING_RATES[m]) for m in experiment.SWEPT)
  assert "d2l_256" not in experiment.SWEPT and sweep_runs == 9
  assert out.count("doc2atom_jax.main") == sweep_runs + 5 and out.count("doc2atom_jax.eval.bank_scale") == 1
  assert "not selected yet" in out and "--config.train.steps=50" in out
  # Sweep results for every method: the finals appear with the selected rates, finished sweeps are skipped.
  for i, method in enumerate(experiment.SWEPT):
    for j, lr in enumerate(experiment.LEARNING_RATES[method]):
      write_eval(experiment.sweep_dir(root, method, lr), [{"step": 50, "nll": 2.0 + abs(j - i % 3) * 0.1}])
  experiment.run_stages("sweep", root, dry_run=True)
  experiment.run_stages("final", root, dry_run=True)
  out = capsys.readouterr().out
  assert out.count("done already") == sweep_runs
  chosen = experiment.selections(root)
  expected = {m: experiment.LEARNING_RATES[m][i % 3] for i, m in enumerate(experiment.SWEPT)}
  assert chosen == {**expected, "d2l_256": expected["d2l"]}  # d2l_256 takes d2l's rate
  assert chosen["d2l"] == 1e-4 and chosen["doc2atom"] == 3e-4  # each method's own grid
  for method, lr in chosen.items():
    assert f"learning rate {method}: {lr:g}" in out
    assert f"--workdir={experiment.final_dir(root, method)} --config.train.learning_rate={lr:g}" in out


def test_eval_waits_for_the_final_runs(tmp_path):
  with pytest.raises(UserError, match="not finished"):
    experiment.run_stages("eval", tmp_path)


def test_every_command_is_a_valid_config_override(tmp_path):
  """Each command's --config.* overrides name existing fields of the config it runs, with values of their type
  (parsed as ml_collections parses them: Python literals, bare strings otherwise)."""
  chosen = {m: 1e-3 for m in experiment.METHODS}
  evals = experiment.eval_commands(tmp_path, "python")
  commands = experiment.sweep_commands(tmp_path, "python") + experiment.final_commands(tmp_path, "python", chosen)
  assert len(commands) == 3 * len(experiment.SWEPT) + len(experiment.METHODS) and len(evals) == 6
  bank = [c for _, c in evals if "doc2atom_jax.eval.bank_scale" in c]
  assert len(bank) == 1 and any(f.startswith("--config.params=") and f.endswith("doc2atom/export") for f in bank[0])
  commands += [(w, c) for w, c in evals if c not in bank]
  for _, command in commands:
    assert command[1:3] == ["-m", "doc2atom_jax.main"] and command[4].startswith("--workdir=")
    config = smollm2_synthetic.get_config(command[3].partition(":")[2] or None)
    config.unlock()
    for flag in command[5:]:
      key, _, text = flag[len("--config."):].partition("=")
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        value = text
      *sections, field = key.split(".")
      node = config
      for name in sections:
        node = node[name]
      assert field in node, flag
      old = node[field]
      if isinstance(old, (tuple, list)) and old:
        assert isinstance(value, tuple), flag
      elif old is not None and not isinstance(old, (tuple, list)):
        assert isinstance(value, type(old)) or (isinstance(old, float) and isinstance(value, int)), flag
      node[field] = value
    if config.mode == "eval":
      assert config.params.endswith("doc2atom/export")
      assert all("=" in e and e.endswith("/export") for e in config.eval.exports)
    if config.train.steps == experiment.SWEEP_STEPS:
      assert config.data.curriculum == () and tuple(config.data.facts_per_document) == (4, 8)
