"""Every config file loads, is locked against typos, and says in its docstring how to run it; the trained
configs switch methods by their argument, and the paper configs' meshes resolve to their fsdp degree."""

import importlib
import pathlib

import pytest

from configs import variants
from doc2atom_jax import modes, parallel
from doc2atom_jax.errors import UserError
from doc2atom_jax.train import data as data_lib

FOLDER = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p.stem for p in FOLDER.glob("*.py") if "def get_config(" in p.read_text())
TRAINED = ("smollm2_synthetic", "gemma2_2b_it", "qwen3_4b")
PAPER = ("gemma2_2b_it", "qwen3_4b")


def load(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def test_helper_modules_are_not_configs():
  assert "variants" not in CONFIGS and {"quickstart", "tiny", *TRAINED} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_locked_with_its_command(name):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config()
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.not_a_field = 1
  assert f"--config=configs/{name}.py" in module.__doc__
  assert config.mode in modes.MODES


@pytest.mark.parametrize("name", TRAINED)
@pytest.mark.parametrize("variant", [None, *variants.VARIANTS])
def test_variants_switch_method_and_rank(name, variant):
  config, default = load(name, variant), load(name)
  assert config.is_locked and config.mode == "train"
  assert config.atoms.method == {"d2l_256": "d2l"}.get(variant, variant or "doc2atom")
  assert config.atoms.chunk_tokens == (256 if variant == "d2l_256" else default.atoms.chunk_tokens)
  if variant in ("d2l", "d2l_256"):
    assert config.compiler.rank == variants.D2L_RANK
    assert config.compiler.alpha == pytest.approx(2 * 8**1.5)  # Doc-to-LoRA's r^1.5 * 2
  else:
    assert (config.compiler.rank, config.compiler.alpha) == (default.compiler.rank, default.compiler.alpha)
  # Everything but the method's own fields is equal across variants (DESIGN §3's equal budget).
  own = {("atoms", "method"), ("atoms", "chunk_tokens"), ("compiler", "rank"), ("compiler", "alpha")}
  flat = lambda c: {(s, k): v for s, section in c.to_dict().items() if isinstance(section, dict)
                    for k, v in section.items() if (s, k) not in own}
  assert flat(config) == flat(default)
  if variant not in (None, "doc2atom"):  # the default needs no argument
    assert f"--config=configs/{name}.py:{variant}" in importlib.import_module(f"configs.{name}").__doc__


def test_unknown_variant_is_a_user_error():
  with pytest.raises(UserError, match="d2l_atom"):
    load("smollm2_synthetic", "lora")


def test_smollm2_synthetic_curriculum_runs_4_to_32_facts():
  config = load("smollm2_synthetic")
  assert config.model.name == "smollm2-135m-instruct" and config.data.source == "tfds"
  stages = data_lib.curriculum_stages(config.data.curriculum)
  assert stages[0] == (0, (4, 8)) and stages[-1][1][1] == 32
  assert stages[-1][0] < config.train.steps  # every stage is trained


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_resolve_a_mesh_with_their_fsdp_degree(name):
  import jax

  config = load(name)
  data, fsdp, tensor = config.train.mesh
  assert (data, tensor) == (-1, 1) and fsdp == 8
  mesh = parallel.make_mesh(config.train.mesh)  # 8 simulated devices (tests/conftest.py)
  assert dict(mesh.shape) == {"data": jax.device_count() // fsdp, "fsdp": fsdp, "tensor": 1}
  questions = config.data.documents_per_step * config.data.questions_per_document
  assert questions % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0  # question rows shard over data x fsdp


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_follow_doc_to_lora(name):
  config = load(name)
  assert config.model.name.startswith("hf:") and config.model.dtype == "bfloat16"
  assert (config.compiler.width, config.compiler.num_blocks) == (512, 9)
  assert (config.train.learning_rate, config.train.warmup_steps, config.train.weight_decay) == (4e-5, 100, 0.01)
  assert config.data.source == "qa" and config.data.self_gen
  assert {"tfds:squad/v1.1@train", "tfds:drop@train", "hf:ropes@train"} <= set(config.data.qa_files)
