"""Pretrained parts -> Cheers: split the tiny oracle checkpoint into the VAE / SigLIP2 / Qwen2.5 layouts,
assemble it back bit for bit, random head modules, vocabulary rows, named errors, init_from=parts:, CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from cheers_jax import convert
from cheers_jax.checkpoint import parts as parts_lib
from cheers_jax.checkpoint import safetensors_io as st
from cheers_jax.checkpoint.hf import CheckpointError, hf_tensor, load_hf_checkpoint, open_tensor_files, read_hf_config
from cheers_jax.model.config import ConfigError
from tests.checkpoint.test_hf import REPO_ROOT, TINY, assert_bit_equal

HEADS = ("und_projector", "gen_projector", "hi_projector", "hi_gate", "time_embed")
EMBED = "model.embed_tokens.weight"

pytestmark = pytest.mark.skipif(not TINY.is_dir(), reason=f"{TINY} not present")


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> dict[str, Path]:
  """The tiny checkpoint's parts; the LLM in two shards with an index."""
  return parts_lib.split_hf_checkpoint(TINY, tmp_path_factory.mktemp("parts"), max_shard_bytes=10**7)


@pytest.fixture(scope="module")
def cfg():
  return read_hf_config(TINY)


def edit_part(src: Path, dst: Path, modify=None, config_edit=None) -> Path:
  """A copy of part directory `src` (one model.safetensors) after modify(tensors) / config_edit(dict)."""
  dst.mkdir(parents=True)
  tensors = {n: np.array(f.get(n)) for n, f in open_tensor_files(src).items()}
  if modify:
    modify(tensors)
  st.save_file(tensors, dst / "model.safetensors")
  if (src / "config.json").is_file():
    config = json.loads((src / "config.json").read_text())
    if config_edit:
      config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
  return dst


def truncated_llm(split, tmp_path: Path, rows: int) -> Path:
  """The LLM part with only its first `rows` vocabulary rows (and a config.json that says so)."""

  def truncate(t):
    t[EMBED] = t[EMBED][:rows]

  return edit_part(split["llm"], tmp_path / "llm_small_vocab", truncate, lambda c: c.update(vocab_size=rows))


def flat(variables) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}


# ---- split / assemble ----------------------------------------------------------------------------
def test_split_writes_the_published_part_layouts(split):
  assert sorted(p.name for p in split["vae"].iterdir()) == ["ae.safetensors", "config.json"]
  assert sorted(p.name for p in split["siglip"].iterdir()) == ["config.json", "model.safetensors"]
  llm_files = sorted(p.name for p in split["llm"].iterdir())
  assert "model.safetensors.index.json" in llm_files and len([f for f in llm_files if f.startswith("model-")]) == 2
  vae = open_tensor_files(split["vae"])
  assert {n.split(".")[0] for n in vae} == {"encoder", "decoder", "bn"}
  assert "encoder.down.0.block.0.conv1.weight" in vae and "bn.running_mean" in vae
  assert all(n.startswith("vision_model.") for n in open_tensor_files(split["siglip"]))
  llm = open_tensor_files(split["llm"])
  assert all(n.startswith("model.") for n in llm) and "model.embed_tokens.weight" in llm  # tied: no lm_head
  qwen = json.loads((split["llm"] / "config.json").read_text())
  assert qwen["model_type"] == "qwen2" and qwen["hidden_size"] == 64 and qwen["tie_word_embeddings"] is True


def test_assemble_round_trip_is_bit_exact(split, cfg, tmp_path):
  """split -> assemble: every part tensor of the new checkpoint equals the original's bit for bit (both
  VAE copies equal the original vae_model copy); the result loads as a Cheers checkpoint."""
  parts_lib.assemble_hf_checkpoint(split, cfg, tmp_path / "hf")
  original, assembled = open_tensor_files(TINY), open_tensor_files(tmp_path / "hf")
  compared = 0
  for name in assembled:
    routed = parts_lib.part_tensor_name(name)
    if routed is None or name.endswith(parts_lib.COUNTER) or name == "lm_head.weight":
      continue
    source = parts_lib.cheers_source_name(*routed)
    assert_bit_equal(np.asarray(assembled[name].get(name)), np.asarray(original[source].get(source)), name)
    compared += 1
  layouts = parts_lib.part_layouts(cfg)
  vae_in_projector = sum(
    1 for n in assembled if n.startswith("model.vae_decoder_projector.") and not n.endswith(parts_lib.COUNTER)
  )
  assert compared == sum(len(v) for v in layouts.values()) - 1 + vae_in_projector  # minus the VAE counter
  assert compared > 300
  load_hf_checkpoint(tmp_path / "hf")  # names and shapes of every module, heads included


def test_head_modules_differ_between_seeds_and_follow_the_random_init(split, cfg):
  """With every part loaded, the head modules are init_variables(cfg, key) of the seed's key (so two
  seeds differ there) and every part leaf is the same whatever the seed."""
  a = flat(parts_lib.load_parts(split, cfg, parts_lib.random_init_rng(0)))
  b = flat(parts_lib.load_parts(split, cfg, parts_lib.random_init_rng(1)))
  init0 = parts_lib.random_variables(cfg, parts_lib.random_init_rng(0))
  differ = {m: False for m in HEADS}
  for path in a:
    module = path.split("/")[1]
    if module in HEADS:
      differ[module] |= not np.array_equal(a[path], b[path])
      np.testing.assert_array_equal(a[path], np.asarray(init0[path]), err_msg=path)
    else:
      np.testing.assert_array_equal(a[path], b[path], err_msg=path)
  assert all(differ.values()), differ
  heads = sorted(p for p in init0 if p.split("/")[1] in HEADS)[::7]
  drawn = parts_lib.random_variables(cfg, parts_lib.random_init_rng(0), only=heads)  # only those, same values
  assert sorted(drawn) == heads
  for path in heads:
    np.testing.assert_array_equal(np.asarray(drawn[path]), np.asarray(init0[path]), err_msg=path)
  assert set(m for m in {p.split("/")[1] for p in a}) == set(HEADS) | {
    "vae_model",
    "vae_decoder_projector",
    "vision_representation",
    "language_model",
  }


def test_smaller_vocabulary_fills_the_first_rows_and_untied_head(split, cfg, tmp_path):
  """A part with fewer vocabulary rows fills the first ones (the rest stay random); an untied Cheers
  takes a tied part's embeddings as its head."""
  rows = 1000
  llm = truncated_llm(split, tmp_path, rows)
  untied = cfg.replace(text=dataclasses.replace(cfg.text, tie_word_embeddings=False))
  rng = parts_lib.random_init_rng(0)
  got = flat(parts_lib.load_parts({"llm": llm}, untied, rng))
  init = parts_lib.random_variables(untied, rng)
  part = np.asarray(open_tensor_files(llm)[EMBED].get(EMBED), np.float32)
  embed, head = got["params/language_model/embed_tokens"], got["params/language_model/lm_head"]
  np.testing.assert_array_equal(embed[:rows], part)
  np.testing.assert_array_equal(embed[rows:], np.asarray(init["params/language_model/embed_tokens"])[rows:])
  np.testing.assert_array_equal(head[:, :rows], part.T)
  np.testing.assert_array_equal(head[:, rows:], np.asarray(init["params/language_model/lm_head"])[:, rows:])


def test_siglip_text_tower_is_ignored(split, cfg, tmp_path):
  def add_text_tower(t):
    t["text_model.embeddings.token_embedding.weight"] = np.zeros((10, 4), ml_dtypes.bfloat16)
    t["logit_scale"] = np.zeros((1,), np.float32)

  siglip = edit_part(split["siglip"], tmp_path / "siglip", add_text_tower)
  got = parts_lib.load_parts({**split, "siglip": siglip}, cfg, parts_lib.random_init_rng(0))
  name = "model.vision_representation.encoder.layers.1.mlp.fc1.weight"
  assert_bit_equal(
    hf_tensor(got, name).astype(ml_dtypes.bfloat16), np.asarray(open_tensor_files(TINY)[name].get(name)), name
  )


# ---- errors --------------------------------------------------------------------------------------
def test_error_wrong_shape_names_the_tensor_and_both_shapes(split, cfg, tmp_path):
  name = "model.layers.1.mlp.up_proj.weight"

  def corrupt(t):
    t[name] = np.zeros((129, 64), ml_dtypes.bfloat16)

  llm = edit_part(split["llm"], tmp_path / "llm", corrupt)
  with pytest.raises(CheckpointError) as e:
    parts_lib.load_parts({"llm": llm}, cfg, parts_lib.random_init_rng(0))
  msg = str(e.value)
  assert "llm part" in msg and name in msg and "(129, 64)" in msg and "(128, 64)" in msg


def test_error_missing_and_unexpected_vae_tensors_are_listed(split, cfg, tmp_path):
  def edit(t):
    del t["decoder.conv_in.weight"]
    t["encoder.extra.weight"] = np.zeros((3,), ml_dtypes.bfloat16)

  vae = edit_part(split["vae"], tmp_path / "vae", edit)
  with pytest.raises(
    CheckpointError,
    match=r"(?s)vae part .*1 missing tensors: decoder\.conv_in\.weight\n.*"
    r"1 unexpected tensors: encoder\.extra\.weight",
  ):
    parts_lib.load_parts({"vae": vae}, cfg, parts_lib.random_init_rng(0))


@pytest.mark.parametrize(
  "part,edit,expected",
  [
    ("llm", lambda c: c.update(hidden_size=128), "hidden_size=128 but the model config has text.hidden_size=64"),
    ("llm", lambda c: c.update(num_hidden_layers=3), "num_hidden_layers=3 but the model config has text.num_layers=2"),
    (
      "siglip",
      lambda c: c["vision_config"].update(patch_size=14),
      "patch_size=14 but the model config has vision.patch_size=16",
    ),
    ("vae", lambda c: c.update(z_channels=16), "z_channels=16 but the model config has vae.z_channels=8"),
  ],
)
def test_error_part_config_disagrees_names_field_and_both_values(split, cfg, tmp_path, part, edit, expected):
  bad = edit_part(split[part], tmp_path / part, config_edit=edit)
  with pytest.raises(CheckpointError, match=f"{part} part .*config.json disagrees") as e:
    parts_lib.load_parts({part: bad}, cfg, parts_lib.random_init_rng(0))
  assert expected in str(e.value)


def test_error_missing_config_and_bad_specs(split, cfg, tmp_path):
  bare = tmp_path / "llm"
  shutil.copytree(split["llm"], bare)
  (bare / "config.json").unlink()
  with pytest.raises(CheckpointError, match="llm part .*config.json not found"):
    parts_lib.load_parts({"llm": bare}, cfg, parts_lib.random_init_rng(0))
  with pytest.raises(CheckpointError, match="vae part .*nowhere: no such directory"):
    parts_lib.load_parts({"vae": tmp_path / "nowhere"}, cfg, parts_lib.random_init_rng(0))
  assert parts_lib.parse_parts_spec("vae=/a, llm=/b") == {"vae": "/a", "llm": "/b"}
  for spec, message in [
    ("vae=/a,text=/b", "unknown part 'text'"),
    ("vae=/a,vae=/b", "given twice"),
    ("", "names no part"),
    ("siglip", "not PART=DIR"),
  ]:
    with pytest.raises(ConfigError, match=message):
      parts_lib.parse_parts_spec(spec)
  # train.calibrate_latent_norm sets the latent statistics of a random VAE only: a VAE part brings its own
  from cheers_jax.train.state import vae_is_random

  assert vae_is_random("") and vae_is_random("parts:llm=/a") and not vae_is_random("parts:vae=/a")
  assert not vae_is_random("hf:/ckpt")


# ---- training and CLI ----------------------------------------------------------------------------
def test_init_from_parts_trains(split, tmp_path):
  """init_from=parts: puts the parts in the sharded train state (here an LLM part with fewer vocabulary
  rows: they fill the first rows of the sharded table), the rest as the random init; it trains."""
  from cheers_jax import sharding
  from cheers_jax.model.cheers import Cheers
  from cheers_jax.train import batching
  from cheers_jax.train import state as state_lib
  from cheers_jax.train import step as step_lib
  from tests.train.common import BATCH, IMAGE, SEQ, TOKENS, small_config
  from tests.train.fake_data import make_batch

  rows = 1000
  parts = {**split, "llm": truncated_llm(split, tmp_path, rows)}
  config = small_config(steps=2)
  config.init_from = "parts:" + ",".join(f"{p}={d}" for p, d in parts.items())
  mesh = sharding.make_mesh(dict(config.mesh))
  state, shardings = state_lib.init_train_state(config, mesh)
  params = flat(jax.device_get(state.params))
  name = "model.language_model.layers.1.mlp.up_proj.weight"
  assert_bit_equal(
    hf_tensor({"params": jax.device_get(state.params)}, name).astype(ml_dtypes.bfloat16),
    np.asarray(open_tensor_files(TINY)[name].get(name)),
    name,
  )
  init = parts_lib.random_variables(
    state_lib.model_config(config),
    jax.random.split(jax.random.PRNGKey(config.seed))[0],
    {"params": shardings.params, "batch_stats": shardings.batch_stats},
  )
  embed = params["language_model/embed_tokens"]
  np.testing.assert_array_equal(embed[:rows], np.asarray(open_tensor_files(parts["llm"])[EMBED].get(EMBED), np.float32))
  np.testing.assert_array_equal(embed[rows:], np.asarray(init["params/language_model/embed_tokens"])[rows:])
  for path, want in init.items():
    if path.split("/")[1] in HEADS and path.startswith("params/"):
      np.testing.assert_array_equal(params[path[len("params/") :]], np.asarray(want), err_msg=path)
  # two steps of the jitted train step on the same batch, as the loop runs it
  model = Cheers(state_lib.model_config(config))
  step_fn = step_lib.make_train_step(model, config, mesh, shardings)
  batch = make_batch(0, 0, BATCH, SEQ, IMAGE, TOKENS)
  batch.pop("num_skipped")
  batch = batching.device_batch(batch, batching.batch_shardings(mesh, batch))
  state, first = step_fn(state, batch)
  state, second = step_fn(state, batch)
  first, second = jax.device_get((first, second))
  assert int(state.step) == 2 and int(first["skipped_nonfinite"]) == int(second["skipped_nonfinite"]) == 0
  assert np.isfinite(first["loss"]) and second["loss"] < first["loss"], (first["loss"], second["loss"])


def test_cli_assemble(split, tmp_path, capsys):
  out = tmp_path / "hf"
  args = [
    "assemble",
    "--vae",
    str(split["vae"]),
    "--siglip",
    str(split["siglip"]),
    "--llm",
    str(split["llm"]),
    "--config",
    str(TINY / "config.json"),
    "--out",
    str(out),
    "--max-shard-size",
    "10MB",
  ]
  assert convert.main(args) == 0
  assert "parts vae, siglip, llm" in capsys.readouterr().out
  name = "model.vae_decoder_projector.decoder.up.0.block.0.conv1.weight"
  src = "model.vae_model.decoder.up.0.block.0.conv1.weight"
  assert_bit_equal(
    np.asarray(open_tensor_files(out)[name].get(name)), np.asarray(open_tensor_files(TINY)[src].get(src)), name
  )
  load_hf_checkpoint(out)
  # configs/tiny.py draws 32-px images: the 64-px SigLIP part does not fit; one line, exit 2
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}
  bad = subprocess.run(
    [
      sys.executable,
      "-m",
      "cheers_jax.convert",
      "assemble",
      "--siglip",
      str(split["siglip"]),
      "--config",
      str(REPO_ROOT / "configs" / "tiny.py"),
      "--out",
      str(tmp_path / "bad"),
    ],
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO_ROOT,
  )
  assert bad.returncode == 2, bad.stderr[-2000:]
  lines = bad.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: siglip part"), bad.stderr[-2000:]
  assert "image_size=64 but the model config has vision.image_size=32" in lines[0]


_SHARDED_SCRIPT = """
import json, pathlib, dataclasses, numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from flax import traverse_util
from cheers_jax.checkpoint import parts as pl, safetensors_io as st
from cheers_jax.checkpoint.hf import abstract_variables, open_tensor_files, read_hf_config
parts = {k: pathlib.Path(v) for k, v in json.loads(PARTS).items()}
cfg = read_hf_config(TINY)
cfg = cfg.replace(text=dataclasses.replace(cfg.text, tie_word_embeddings=False))
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
def spec(x):
  return NamedSharding(mesh, P(*[a if s % 2 == 0 else None for a, s in zip(("a", "b"), x.shape)]))
rng = pl.random_init_rng(0)
shardings = jax.tree.map(spec, abstract_variables(cfg))
got = traverse_util.flatten_dict(pl.load_parts(parts, cfg, rng, shardings=shardings), sep="/")
ref = traverse_util.flatten_dict(pl.load_parts(parts, cfg, rng), sep="/")
for k, want in ref.items():
  assert got[k].sharding == spec(want) and len(got[k].addressable_shards) == 4, k
  np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want), err_msg=k)
print("OK", len(ref))
"""


@pytest.mark.heavy  # a fresh process compiles the init twice (~1 min on 2 cores)
def test_load_parts_sharded_over_four_host_devices(split, tmp_path):
  """Part leaves stream shard by shard, the smaller vocabulary's rows land across shard boundaries of
  the embedding table and the untied head; the result equals the unsharded load."""
  parts = {**split, "llm": truncated_llm(split, tmp_path, 1001)}
  env = {
    **os.environ,
    "PYTHONPATH": str(REPO_ROOT),
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    "JAX_PLATFORMS": "cpu",
  }
  script = f"TINY = {str(TINY)!r}\nPARTS = {json.dumps({k: str(v) for k, v in parts.items()})!r}\n" + _SHARDED_SCRIPT
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
