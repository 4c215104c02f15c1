"""Ablation variants: overrides applied to a copy, names and fields checked before any training."""

import pytest

from configs import quickstart
from doc2atom_jax.errors import UserError
from doc2atom_jax.eval import ablation


def test_every_variant_applies_to_the_quickstart_config():
  config = quickstart.get_config()
  for name, (_, overrides) in ablation.VARIANTS.items():
    varied = ablation.variant_config(config, name)
    for field, value in overrides.items():
      section, key = field.split(".")
      assert varied[section][key] == value
  assert config.compiler.rank == 1 and ablation.variant_config(config, "rank2").compiler.rank == 2  # a copy


def test_unknown_variants_and_fields_are_refused(monkeypatch):
  config = quickstart.get_config()
  with pytest.raises(UserError, match="unknown ablation variant 'rank3'"):
    ablation.variant_config(config, "rank3")
  monkeypatch.setitem(ablation.VARIANTS, "typo", ("", {"compiler.rnak": 2}))
  with pytest.raises(UserError, match="no field compiler.rnak"):
    ablation.variant_config(config, "typo")


def test_table_has_a_row_per_variant_and_template_set():
  row = lambda name, em: {"variant": name, "train_seconds": 10.0, "results": {
      t: {"doc2atom": {"tf_em": em, "nll": 1.0, "route_top1": 0.5}, "doc2atom_oracle": {"tf_em": 0.25}}
      for t in ablation.TEMPLATES}}
  table = ablation.format_table([row("v2", 0.125), row("rank2", 0.5)])
  assert table.count("| v2 | 10 | 0.125 | 1.000 | 0.500 | 0.250 |") == 2
  assert "seen templates:" in table and "unseen templates:" in table and table.count("| rank2 |") == 2


def test_the_v1_to_v2_chain_adds_one_group_at_a_time():
  config = quickstart.get_config()
  chain = [ablation.variant_config(config, n) for n in ("v1", "v1+loss", "v1+loss+router", "v1+loss+router+copy",
                                                          "v2")]
  v1, loss, router, copy, v2 = chain
  assert (v1.loss.ce, v1.loss.kd_tokens, v1.atoms.abstain, v1.compiler.copy_dim) == (0.1, "all", "null", 128)
  assert (loss.loss.ce, loss.loss.kd_tokens, loss.loss.atom_target, loss.atoms.abstain) == (1.0, "right", "gold", "null")
  assert (router.compiler.route_skip, router.atoms.route_score, router.compiler.copy_dim) == (True, "fused", 128)
  assert (copy.compiler.copy_dim, copy.train.schedule, v2.train.schedule) == (576, "cosine", "constant")
  assert ablation.config_fingerprint(v2) == ablation.config_fingerprint(config)


def test_saved_results_are_reused_only_for_the_same_config(tmp_path, monkeypatch):
  from doc2atom_jax import modes  # pylint: disable=import-outside-toplevel
  from doc2atom_jax.train import trainer  # pylint: disable=import-outside-toplevel

  trained = []
  monkeypatch.setattr(modes, "fit", lambda cfg, workdir: trained.append(cfg.train.schedule) or
                      (None, [{"step": cfg.train.steps}], None, None))
  monkeypatch.setattr(trainer, "run_trajectory", lambda workdir, history: [{"step_time_s": 2.0}])
  monkeypatch.setattr(ablation.quick, "evaluate", lambda system, docs, **kw: {"doc2atom": {"tf_em": len(trained)}})
  config = quickstart.get_config()
  documents = {"seen": [1, 2], "unseen": [3, 4]}
  first = ablation.run_variant(config, "v2", tmp_path, documents)
  config.train.state_cache = not config.train.state_cache  # changes no number: reused
  assert ablation.run_variant(config, "v2", tmp_path, documents) == first and trained == ["constant"]
  config.train.schedule = "cosine"  # a global override changes what "v2" trains: trained again
  again = ablation.run_variant(config, "v2", tmp_path, documents)
  assert trained == ["constant", "cosine"] and again["results"]["seen"]["doc2atom"]["tf_em"] == 2
