"""The run config loader: impossible values are refused with the key named (issue 13 item 5)."""

from __future__ import annotations

import pytest

from cheers_jax import config as config_lib
from cheers_jax.errors import ConfigError


@pytest.mark.parametrize(
  "override, key",
  [
    ("train.steps=-5", "train.steps"),  # was: exit 0, "done at step 0", an untrained export
    ("train.lr=-1", "train.lr"),  # was: trained
    ("train.batch_size=0", "train.batch_size"),  # was: "max() arg is an empty sequence" after 22 s
    ("train.lr=nan", "train.lr"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio"),
    ("train.b2=1.0", "train.b2"),
    ("data.cfg_data_rate=-0.1", "data.cfg_data_rate"),
    ("data.mix.und=-1", "data.mix.und"),
    ("data.first_samples=-1", "data.first_samples"),
    ("data.seq_buckets=(96,64)", "data.seq_buckets"),
    ("mesh.fsdp=0", "mesh.fsdp"),
    ("checkpoint.every_steps=0", "checkpoint.every_steps"),
    ("log_every=0", "log_every"),
    ("sample_cfg=inf", "sample_cfg"),
    ("seed=-1", "seed"),
  ],
)
def test_impossible_values_are_config_errors_naming_the_key(override, key):
  with pytest.raises(ConfigError) as info:
    config_lib.load("tiny", [override])
  message = str(info.value)
  assert message.startswith(key + "=") and "\n" not in message, message


def test_a_mix_with_every_weight_zero_is_refused():
  with pytest.raises(ConfigError, match="every weight is 0"):
    config_lib.load("tiny", ["data.mix.und=0", "data.mix.gen=0", "data.mix.text=0"])


def test_a_first_phase_mix_is_checked_when_there_is_a_first_phase():
  with pytest.raises(ConfigError, match="^data.first_mix.gen=-2"):
    config_lib.load("tiny", ["data.first_samples=64", "data.first_mix.gen=-2"])
  with pytest.raises(ConfigError, match="data.first_mix .*every weight is 0"):
    config_lib.load("tiny", ["data.first_samples=64", "data.first_mix.gen=0"])
  config_lib.load("tiny", ["data.first_mix.gen=0"])  # no first phase: its mix is not used


def test_shipped_configs_and_recipes_pass():
  import glob
  import os

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for name in config_lib.NAMED:
    config_lib.load(name)
  stages = os.path.join(repo, "configs", "stages.py")
  files = sorted(p for p in glob.glob(os.path.join(repo, "configs", "stage*.py")) if p != stages)
  assert len(files) == 4
  for path in files:  # each stage's file is the variant of stages.py it is named after
    stage = os.path.basename(path)[:-3]
    assert config_lib.load(path).to_dict() == config_lib.load(f"{stages}:{stage}").to_dict()
  with pytest.raises(ConfigError, match="unknown stage 'stage5'; did you mean 'stage4_sft'"):
    config_lib.load(f"{stages}:stage5")


def test_load_checks_across_keys_once():
  """Issue 24: config.load does every check (the Trainer no longer re-checks), cross-field ones included."""
  for override, message in [
    ("train.nan_policy=maybe", "choose one of"),
    ("data.shapes_gen_placement=middle", "choose one of"),
    ("train.grad_accum=3", "not divisible"),
    ("data.image_size=64", "model.vision.image_size=32"),
    ("model.text.num_layerz=2", "num_layerz"),
  ]:
    with pytest.raises(ConfigError, match=message):
      config_lib.load("tiny", [override])


def test_model_config_is_one_cached_conversion():
  a, b = config_lib.load("tiny"), config_lib.load("tiny")
  assert config_lib.model_config(a) is config_lib.model_config(b)  # equal sections: one object
  c = config_lib.load("tiny", ["model.text.num_layers=3"])
  assert config_lib.model_config(c).text.num_layers == 3 and config_lib.model_config(a).text.num_layers == 2


def test_a_shipped_name_is_not_shadowed_by_a_folder_or_file_of_that_name(tmp_path, monkeypatch):
  """CI of session 9: `train --workdir tiny` made a folder ./tiny; `aot --config tiny` then read it as a file."""
  monkeypatch.chdir(tmp_path)
  (tmp_path / "tiny").mkdir()
  assert config_lib.load("tiny").model.text.num_layers == 2
  (tmp_path / "cheers_1p5b").write_text("not a config")
  assert config_lib.load("cheers_1p5b").to_dict() == config_lib.NAMED["cheers_1p5b"]().to_dict()
  (tmp_path / "mine.py").write_text("from cheers_jax import config\n\ndef get_config():\n  return config.tiny()\n")
  assert config_lib.is_path("mine.py") and config_lib.is_path("./tiny") and not config_lib.is_path("tiny")
  with pytest.raises(ConfigError, match="config file './tiny' not found"):
    config_lib.load("./tiny")  # a path spelt as one is a path: the folder is no config file
  with pytest.raises(ConfigError, match="unknown config name"):
    config_lib.load("tinny")
