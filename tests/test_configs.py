"""Every config file loads, is locked against typos, and says in its docstring how to run it."""

import importlib
import pathlib

import pytest

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py")
                 if p.stem != "__init__")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_locked_with_its_command(name):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config()
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.not_a_field = 1
  assert f"--config=configs/{name}.py" in module.__doc__
  assert config.mode in ("generate", "train", "compile", "ask")
