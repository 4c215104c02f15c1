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
