"""HF checkpoint I/O: the tiny oracle checkpoint, round trips, the full-size tensor list, errors, CLI."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import safe_open

from cheers_jax import convert
from cheers_jax.checkpoint import safetensors_io as st
from cheers_jax.checkpoint.hf import (
  CheckpointError,
  hf_name_map,
  hf_tensor_shapes,
  load_hf_checkpoint,
  module_param_counts,
  save_hf_checkpoint,
  _from_torch,
  leaf_reader,
)
from cheers_jax.model.cheers import init_variables
from cheers_jax.model.config import ConfigError, ModelConfig
from tests import oracle

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY, REFERENCE = oracle.TINY, oracle.REFERENCE
# The published checkpoint's tokenizer files (Qwen2.5's, shipped as cheers_jax/assets/tokenizer), by digest.
OFFICIAL_TOKENIZER_SHA256 = {
  "vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
  "merges.txt": "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5",
  "tokenizer_config.json": "d06799f3d7aa5d779d98f9e4d9465ca8fa9b951ddeb40bb2d08427e35ca06a07",
}
MODULES = (
  "vae_model",
  "vae_decoder_projector",
  "vision_representation",
  "und_projector",
  "time_embed",
  "gen_projector",
  "hi_gate",
  "hi_projector",
  "language_model",
)


# ---- helpers -------------------------------------------------------------------------------------
def read_with_safetensors(ckpt_dir: Path) -> dict[str, np.ndarray]:
  """All tensors of an HF checkpoint via the `safetensors` package (an independent reader)."""
  index = ckpt_dir / "model.safetensors.index.json"
  files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
  out = {}
  for fname in files:
    # numpy has no bf16 and jax (without x64) no int64: read each kind with the one that has it
    with (
      safe_open(str(ckpt_dir / fname), framework="numpy") as fn,
      safe_open(str(ckpt_dir / fname), framework="flax") as fj,
    ):
      for name in fn.keys():
        assert name not in out, f"{name} stored twice"
        bf16 = fn.get_slice(name).get_dtype() == "BF16"
        out[name] = np.asarray(fj.get_tensor(name)) if bf16 else fn.get_tensor(name)
  return out


def flat(variables) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}


def assert_bit_equal(a: np.ndarray, b: np.ndarray, what: str) -> None:
  assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
  assert a.tobytes() == b.tobytes(), what


def write_ckpt(src: Path, dst: Path, modify=None, config_edit=None, max_shard_bytes: int = 10**7) -> Path:
  """Copy of `src` (re-sharded with our writer) after `modify(tensors)` / `config_edit(cfg_dict)`."""
  tensors = {k: np.array(v) for k, v in read_with_safetensors(src).items()}
  if modify:
    modify(tensors)
  st.save_sharded(tensors, dst, max_shard_bytes, metadata={"format": "pt"})
  cfg = json.loads((src / "config.json").read_text())
  if config_edit:
    config_edit(cfg)
  (dst / "config.json").write_text(json.dumps(cfg))
  return dst


@pytest.fixture(scope="module")
def tiny_tensors() -> dict[str, np.ndarray]:
  return read_with_safetensors(TINY)


@pytest.fixture(scope="module")
def tiny_bf16():
  return load_hf_checkpoint(TINY, dtype=jnp.bfloat16)


# ---- safetensors_io ------------------------------------------------------------------------------
def test_safetensors_writer_reader_roundtrip(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
    "a.bf16": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16),
    "b.f32": rng.normal(size=(7,)).astype(np.float32),
    "c.f16": rng.normal(size=(2, 2, 2)).astype(np.float16),
    "d.i64": np.array(3, np.int64),  # 0-d
    "e.empty": np.zeros((0, 4), np.float32),
    "f.u8": np.arange(5, dtype=np.uint8),
  }
  index = st.save_sharded(tensors, tmp_path, max_shard_bytes=40)
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 1
  assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
  for fname in shards:
    ours = st.load_file(tmp_path / fname)
    assert all(isinstance(v.base, np.ndarray) or isinstance(v, np.memmap) for v in ours.values())
    ref = read_with_safetensors(tmp_path)  # the reference reader accepts every shard
    for k in ours:
      assert_bit_equal(ref[k], tensors[k], k)
      assert_bit_equal(np.asarray(ours[k]), tensors[k], k)


def test_safetensors_reader_rejects_bad_offsets(tmp_path):
  p = tmp_path / "x.safetensors"
  st.save_file({"w": np.ones((4,), np.float32)}, p)
  raw = bytearray(p.read_bytes())
  p.write_bytes(bytes(raw[:-4]))  # truncated data
  with pytest.raises(st.SafetensorsFormatError, match="'w'"):
    st.read_header(p)


# ---- (a) load the tiny oracle checkpoint ---------------------------------------------------------
def test_load_tiny_consumes_every_tensor(tiny_tensors):
  cfg, variables = load_hf_checkpoint(TINY)  # fp32
  assert cfg.text.hidden_size == 64 and cfg.vae.ch == 32 and cfg.text.tie_word_embeddings
  ours = flat(variables)
  mapped = hf_tensor_shapes(variables, store_lm_head=False)
  assert set(mapped) == set(tiny_tensors), set(mapped) ^ set(tiny_tensors)
  assert sum(math.prod(s) for s in mapped.values()) == sum(t.size for t in tiny_tensors.values())
  consumed = set()
  for path, entry in hf_name_map(variables).items():
    leaf = ours[path]
    assert leaf.dtype == np.float32
    for i, name in enumerate(entry.names()):
      want = _from_torch(tiny_tensors[name], entry.transform).astype(np.float32)
      got = leaf[i] if entry.num_layers is not None else leaf
      assert_bit_equal(got, want, f"{path} <- {name}")
      consumed.add(name)
  # the counters are the only tensors not read into a leaf
  assert set(tiny_tensors) - consumed == {
    "model.vae_model.bn.num_batches_tracked",
    "model.vae_decoder_projector.bn.num_batches_tracked",
  }
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["batch_stats"]) == {"vae_model", "vae_decoder_projector"}


def test_load_with_cfg_overrides_numerics_only():
  user = ModelConfig().replace(dtype="float32", remat_policy="full")
  with pytest.warns(UserWarning, match="text.hidden_size"):
    cfg, _ = load_hf_checkpoint(TINY, cfg=user)
  assert cfg.dtype == "float32" and cfg.remat_policy == "full" and cfg.text.hidden_size == 64


# ---- (b) round trips -----------------------------------------------------------------------------
def test_roundtrip_bf16_bit_exact(tmp_path, tiny_bf16, tiny_tensors):
  cfg, variables = tiny_bf16
  index = save_hf_checkpoint(variables, cfg, tmp_path / "out", dtype="bfloat16", max_shard_bytes=8 * 10**6)
  assert len(set(index["weight_map"].values())) > 1  # really sharded
  saved = read_with_safetensors(tmp_path / "out")
  assert set(saved) == set(tiny_tensors) | {"lm_head.weight"}
  assert set(index["weight_map"]) == set(saved)
  assert index["metadata"]["total_size"] == sum(t.nbytes for t in saved.values())
  for name, t in tiny_tensors.items():  # same bytes as the original (the counters are written as 0)
    assert_bit_equal(saved[name], t, name)
  assert_bit_equal(saved["lm_head.weight"], tiny_tensors["model.language_model.embed_tokens.weight"], "lm_head")
  hf_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
  assert ModelConfig.from_hf_dict(hf_cfg) == cfg

  cfg2, again = load_hf_checkpoint(tmp_path / "out", dtype=jnp.bfloat16)
  assert cfg2 == cfg
  a, b = flat(variables), flat(again)
  assert a.keys() == b.keys()
  for k in a:
    assert_bit_equal(b[k], a[k], k)


def test_roundtrip_without_lm_head_matches_original_names(tmp_path, tiny_bf16, tiny_tensors):
  cfg, variables = tiny_bf16
  save_hf_checkpoint(variables, cfg, tmp_path, store_lm_head=False)
  saved = read_with_safetensors(tmp_path)
  assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in tiny_tensors.items()}


def test_roundtrip_fp32_bit_exact(tmp_path, tiny_tensors):
  cfg, variables = load_hf_checkpoint(TINY, dtype=jnp.float32)
  save_hf_checkpoint(variables, cfg, tmp_path, dtype="float32")
  saved = read_with_safetensors(tmp_path)
  for name, t in tiny_tensors.items():
    assert saved[name].dtype == (np.int64 if t.dtype == np.int64 else np.float32), name
    assert_bit_equal(saved[name], t.astype(saved[name].dtype), name)
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float32"
  _, again = load_hf_checkpoint(tmp_path, dtype=jnp.float32)
  a, b = flat(variables), flat(again)
  for k in a:
    assert_bit_equal(b[k], a[k], k)


def test_single_file_checkpoint_and_tied_head_check(tmp_path, tiny_bf16):
  cfg, variables = tiny_bf16
  save_hf_checkpoint(variables, cfg, tmp_path / "one", max_shard_bytes=10**12)  # one shard
  # as a lone model.safetensors without index
  (tmp_path / "one" / "model-00001-of-00001.safetensors").rename(tmp_path / "one" / "model.safetensors")
  (tmp_path / "one" / "model.safetensors.index.json").unlink()
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # lm_head equals embed_tokens: no warning
    _, again = load_hf_checkpoint(tmp_path / "one", dtype=jnp.bfloat16)
  assert_bit_equal(
    np.asarray(again["params"]["language_model"]["embed_tokens"]),
    np.asarray(variables["params"]["language_model"]["embed_tokens"]),
    "embed",
  )

  def change_head(t):
    t["lm_head.weight"] = t["model.language_model.embed_tokens.weight"].copy()
    t["lm_head.weight"][0] += 1

  write_ckpt(tmp_path / "one", tmp_path / "diff", change_head)
  with pytest.warns(UserWarning, match="lm_head.weight differs"):
    _, again = load_hf_checkpoint(tmp_path / "diff", dtype=jnp.bfloat16)
  assert_bit_equal(
    np.asarray(again["params"]["language_model"]["embed_tokens"]),
    np.asarray(variables["params"]["language_model"]["embed_tokens"]),
    "embed is used",
  )


def test_untied_head_is_a_parameter(tmp_path, tiny_tensors):
  embed = tiny_tensors["model.language_model.embed_tokens.weight"]
  head = (embed.astype(np.float32) * 2).astype(ml_dtypes.bfloat16)

  def untie(c):
    c["tie_word_embeddings"] = False
    c["text_config"]["tie_word_embeddings"] = False

  write_ckpt(TINY, tmp_path / "untied", lambda t: t.update({"lm_head.weight": head}), untie)
  cfg, variables = load_hf_checkpoint(tmp_path / "untied", dtype=jnp.bfloat16)
  assert not cfg.text.tie_word_embeddings
  assert_bit_equal(np.asarray(variables["params"]["language_model"]["lm_head"]), head.T, "lm_head (D, V)")
  save_hf_checkpoint(variables, cfg, tmp_path / "out", store_lm_head=False)  # an untied head is always stored
  assert_bit_equal(read_with_safetensors(tmp_path / "out")["lm_head.weight"], head, "lm_head")
  write_ckpt(TINY, tmp_path / "headless", None, untie)
  with pytest.raises(CheckpointError, match="1 missing tensors: lm_head.weight"):
    load_hf_checkpoint(tmp_path / "headless")


# ---- (c) full size against the published tensor list ---------------------------------------------
# Parameters per module of the published checkpoint (BatchNorm buffers excluded).
README_PARAMS = {
  "vae_model": 84_046_115,
  "vae_decoder_projector": 49_620_259,
  "vision_representation": 428_772_800,
  "und_projector": 28_320_000,
  "language_model": 1_543_714_304,
  "gen_projector": 347_698_176,
  "hi_gate": 1_331_713,
  "hi_projector": 83_454_464,
  "time_embed": 4_379_904,
}


def test_full_size_names_and_shapes_match_published_tsv(record_property):
  cfg = ModelConfig.from_hf_dict(json.loads((REFERENCE / "config.json").read_text()))
  abstract = jax.eval_shape(lambda: init_variables(cfg, jax.random.PRNGKey(0)))
  rows = [line.rstrip("\n").split("\t") for line in (REFERENCE / "cheers_1p5b_tensors.tsv").open()][1:]
  want = {r[0]: () if r[1] == "scalar" else tuple(int(d) for d in r[1].split("x")) for r in rows}
  assert len(want) == len(rows) == 1321
  got = hf_tensor_shapes(abstract, store_lm_head=True)
  assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
  assert {k: got[k] for k in want} == want
  assert sum(math.prod(s) for s in got.values()) == sum(int(r[3]) for r in rows)

  with_stats = module_param_counts(abstract)
  params = module_param_counts(nn_params_only(abstract))
  assert set(params) == set(MODULES)
  for m in MODULES:
    print(f"{m:24s} params {params[m]:>14,}  (+ batch_stats: {with_stats[m]:>14,})")
    record_property(f"params.{m}", params[m])
  assert params == README_PARAMS
  total = sum(params.values())
  print(f"{'total (unique)':24s} params {total:>14,}")
  assert total == 2_571_337_735
  # as stored: + BN stats (2 x 2 x 128) + the two counters + the separate lm_head copy
  assert total + 512 + 2 + 151936 * 1536 == sum(int(r[3]) for r in rows)


def nn_params_only(abstract):
  return {"params": abstract["params"]}


# ---- (d) errors ----------------------------------------------------------------------------------
def test_error_shape_mismatch(tmp_path):
  name = "model.language_model.layers.1.mlp.up_proj.weight"

  def corrupt(t):
    t[name] = np.zeros((129, 64), ml_dtypes.bfloat16)

  write_ckpt(TINY, tmp_path, corrupt)
  with pytest.raises(CheckpointError) as e:
    load_hf_checkpoint(tmp_path)
  msg = str(e.value)
  assert name in msg and "(129, 64)" in msg and "(128, 64)" in msg


def test_error_missing_and_unexpected_are_all_listed(tmp_path):
  gone = [
    "model.hi_gate.gate.2.bias",
    "model.vae_model.encoder.conv_in.weight",
    "model.language_model.layers.0.self_attn.q_proj.bias",
  ]
  extra = ["model.hi_gate.gate.4.weight", "model.something_new.bias"]

  def edit(t):
    for k in gone:
      del t[k]
    for k in extra:
      t[k] = np.zeros((3,), ml_dtypes.bfloat16)

  write_ckpt(TINY, tmp_path, edit)
  with pytest.raises(CheckpointError) as e:
    load_hf_checkpoint(tmp_path)
  msg = str(e.value)
  assert "3 missing tensors" in msg and "2 unexpected tensors" in msg
  for k in gone + extra:
    assert k in msg


def test_error_single_missing_tensor(tmp_path):
  write_ckpt(TINY, tmp_path, lambda t: t.pop("model.und_projector.mlp.2.weight"))
  with pytest.raises(CheckpointError, match=r"1 missing tensors: model\.und_projector\.mlp\.2\.weight"):
    load_hf_checkpoint(tmp_path)


def test_error_single_unexpected_tensor(tmp_path):
  def add(t):
    t["model.vision_representation.encoder.layers.2.mlp.fc1.bias"] = np.zeros((128,), ml_dtypes.bfloat16)

  write_ckpt(TINY, tmp_path, add)
  with pytest.raises(CheckpointError, match=r"1 unexpected tensors: model\.vision_representation\.encoder"):
    load_hf_checkpoint(tmp_path)


def test_error_long_lists_are_truncated(tmp_path):
  write_ckpt(TINY, tmp_path, lambda t: [t.pop(k) for k in list(t) if ".encoder.layers." in k])
  with pytest.raises(CheckpointError, match=r"32 missing tensors: .*\.\.\. and 12 more"):
    load_hf_checkpoint(tmp_path)


def test_error_missing_shard_file(tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(TINY, dst)
  os.chmod(dst, 0o755)
  (dst / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(CheckpointError) as e:
    load_hf_checkpoint(dst)
  msg = str(e.value)
  assert "model-00002-of-00002.safetensors" in msg and "model.safetensors.index.json" in msg


def test_error_unknown_config_key(tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(TINY, dst)
  os.chmod(dst, 0o755)
  cfg = json.loads((dst / "config.json").read_text())
  cfg["vae_encoder_confg"] = {"ch": 32}
  (dst / "config.json").unlink()
  (dst / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError, match="vae_encoder_confg") as e:
    load_hf_checkpoint(dst)
  assert "config.json" in str(e.value)


@pytest.mark.parametrize(
  "edit, named",
  [
    (lambda c: c["text_config"].update(num_hidden_layers=-1), "text_config.num_hidden_layers=-1"),
    (lambda c: c.pop("text_config"), "no text_config section"),
    (lambda c: c["text_config"].update(hidden_size="64"), "text_config.hidden_size='64'"),
    (lambda c: c["vision_representation_config"].update(layer_norm_eps=None), "layer_norm_eps=None"),
  ],
)
def test_config_json_values_are_checked_before_the_tensors(tmp_path, edit, named):
  """Issue 13 item 7: num_hidden_layers=-1 or no text_config passed and failed later as "24 unexpected /
  312 missing tensors"; a string where a number belongs raised "TypeError: not all arguments converted
  during string formatting". Each is now a ConfigError naming the config.json key."""
  dst = tmp_path / "ckpt"
  shutil.copytree(TINY, dst)
  os.chmod(dst, 0o755)
  cfg = json.loads((dst / "config.json").read_text())
  edit(cfg)
  (dst / "config.json").unlink()
  (dst / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError) as e:
    load_hf_checkpoint(dst)
  msg = str(e.value)
  assert named in msg and "config.json" in msg and "tensors" not in msg and "\n" not in msg, msg


def test_error_no_checkpoint_files(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "umm"}))
  with pytest.raises(CheckpointError, match="model.safetensors"):
    load_hf_checkpoint(tmp_path)


# ---- (e) CLI -------------------------------------------------------------------------------------
def test_cli_hf_orbax_hf_bit_identical(tmp_path, tiny_tensors, capsys):
  orb, back = tmp_path / "orbax", tmp_path / "hf"
  assert convert.main(["hf-to-orbax", "--hf", str(TINY), "--out", str(orb)]) == 0
  assert (orb / "state").is_dir() and (orb / "model_config.json").is_file()
  assert convert.main(["orbax-to-hf", "--orbax", str(orb), "--out", str(back), "--max-shard-size", "10MB"]) == 0
  saved = read_with_safetensors(back)
  assert set(saved) == set(tiny_tensors) | {"lm_head.weight"}
  for name, t in tiny_tensors.items():
    assert_bit_equal(saved[name], t, name)
  assert len(set(json.loads((back / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
  # self-contained: the tokenizer files and the processor / generation configs of the published checkpoint
  for name, digest in OFFICIAL_TOKENIZER_SHA256.items():
    assert hashlib.sha256((back / name).read_bytes()).hexdigest() == digest, name
  assert json.loads((back / "generation_config.json").read_text()) == json.loads(
    (REFERENCE / "generation_config.json").read_text()
  )
  pre, ref_pre = (
    json.loads(p.read_text()) for p in (back / "preprocessor_config.json", REFERENCE / "preprocessor_config.json")
  )
  assert pre == dict(ref_pre, scale_resolution=64)  # the tiny model's resolution
  capsys.readouterr()
  assert convert.main(["orbax-to-hf", "--orbax", str(orb), "--out", str(back)]) == 2  # refused: not empty
  assert "not empty" in capsys.readouterr().err
  assert convert.main(["orbax-to-hf", "--orbax", str(orb), "--out", str(back), "--force", "--no-lm-head"]) == 0
  assert set(read_with_safetensors(back)) == set(tiny_tensors)
  assert len(list(back.glob("*.safetensors"))) == 1  # stale shards removed


def test_cli_help_and_sizes():
  out = subprocess.run(
    [sys.executable, "-m", "cheers_jax.convert", "orbax-to-hf", "--help"],
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
    env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
  )
  assert out.returncode == 0 and "--max-shard-size" in out.stdout and "--dtype" in out.stdout
  assert convert.parse_size("5GB") == 5 * 10**9 and convert.parse_size("2GiB") == 2 * 2**30
  assert convert.parse_size("1234") == 1234


# ---- (f) sharded placement -----------------------------------------------------------------------
def test_load_with_sharding_tree(tiny_bf16):
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = NamedSharding(mesh, P())
  abstract = jax.eval_shape(lambda: init_variables(tiny_bf16[0], jax.random.PRNGKey(0)))
  tree = jax.tree.map(lambda _: sharding, abstract)  # boxed like the variables: the loader unboxes
  _, variables = load_hf_checkpoint(TINY, dtype=jnp.bfloat16, shardings=tree)
  ref = flat(tiny_bf16[1])
  for path, leaf in traverse_util.flatten_dict(variables, sep="/").items():
    assert leaf.sharding == sharding, path
    assert_bit_equal(np.asarray(leaf), ref[path], path)
  _, same = load_hf_checkpoint(TINY, dtype=jnp.bfloat16, shardings=sharding)  # one for all leaves
  assert all(x.sharding == sharding for x in jax.tree.leaves(same))


def test_leaf_reader_reads_partial_slices(tiny_bf16):
  from cheers_jax.checkpoint.hf import open_tensor_files

  files = open_tensor_files(TINY)
  entries = hf_name_map(tiny_bf16[1])
  ref = flat(tiny_bf16[1])
  cases = [
    ("params/language_model/layers/mlp/up_proj/kernel", (slice(1, 2), slice(None), slice(3, 70))),
    ("params/vae_model/encoder/conv_in/kernel", (slice(None), slice(1, 3), slice(None), slice(5, 9))),
    ("params/language_model/embed_tokens", (slice(100, 200), slice(None))),
  ]
  for path, index in cases:
    got = leaf_reader(entries[path], files, np.dtype(ml_dtypes.bfloat16))(index)
    assert_bit_equal(got, ref[path][index], path)


_MULTI_DEVICE_SCRIPT = """
import numpy as np, jax, jax.numpy as jnp, flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from cheers_jax.checkpoint.hf import load_hf_checkpoint
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
_, ref = load_hf_checkpoint(TINY)
def spec(x):
  dims = [a if s % 2 == 0 else None for a, s in zip(("data", "model"), x.shape)]
  return NamedSharding(mesh, P(*dims))
_, got = load_hf_checkpoint(TINY, shardings=jax.tree.map(spec, ref))
for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
  assert len(b.addressable_shards) == 4
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
print("OK", len(jax.devices()))
"""


def test_load_sharded_over_four_host_devices():
  env = {
    **os.environ,
    "PYTHONPATH": str(REPO_ROOT),
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    "JAX_PLATFORMS": "cpu",
  }
  out = subprocess.run(
    [sys.executable, "-c", f"TINY = {str(TINY)!r}\n" + _MULTI_DEVICE_SCRIPT],
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO_ROOT,
  )
  assert out.returncode == 0 and "OK 4" in out.stdout, out.stderr[-3000:]
