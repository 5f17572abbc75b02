"""Run in a subprocess with 8 fake CPU devices (see test_sharding.py): the train step on meshes
data=8, fsdp=8 and fsdp=4 x tensor=2 against one device, and the shardings of the state.

Prints one JSON line `RESULT {...}`; exits non-zero (AssertionError) on a mismatch.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from cheers_jax import sharding
from cheers_jax.model.cheers import Cheers
from cheers_jax.train import batching
from cheers_jax.train import state as state_lib
from cheers_jax.train import step as step_lib
from tests.train.common import IMAGE, SEQ, TOKENS, adam_mu, compare_updates, small_config
from tests.train.fake_data import make_batch

MESHES = {
  "data8": {"data": 8, "fsdp": 1, "tensor": 1},
  "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
  "fsdp4_tensor2": {"data": 1, "fsdp": 4, "tensor": 2},
}
BATCH = 8

# leaf -> expected PartitionSpec per mesh (the rules of cheers_jax/sharding.py, size-1 axes dropped)
EXPECTED = {
  ("language_model", "embed_tokens"): {
    "data8": P(None, None),
    "fsdp8": P(None, "fsdp"),
    "fsdp4_tensor2": P("tensor", "fsdp"),
  },
  ("language_model", "layers", "mlp", "up_proj", "kernel"): {
    "data8": P(None, None, None),
    "fsdp8": P(None, "fsdp", None),
    "fsdp4_tensor2": P(None, "fsdp", "tensor"),
  },
  ("language_model", "layers", "mlp", "down_proj", "kernel"): {
    "data8": P(None, None, None),
    "fsdp8": P(None, None, "fsdp"),
    "fsdp4_tensor2": P(None, "tensor", "fsdp"),
  },
  # a logical axis named twice / two names on one mesh axis: the first dim keeps it
  ("time_embed", "mlp_1_2", "kernel"): {
    "data8": P(None, None),
    "fsdp8": P("fsdp", None),
    "fsdp4_tensor2": P("fsdp", None),
  },
  ("und_projector", "fc1", "kernel"): {
    "data8": P(None, None),
    "fsdp8": P(None, None),
    "fsdp4_tensor2": P("tensor", None),
  },
}


def leaf(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def norm_spec(spec: P, ndim: int) -> P:
  return P(*(tuple(spec) + (None,) * (ndim - len(spec))))


def check_shardings(state, name: str) -> None:
  for path, want in EXPECTED.items():
    for tree_name, tree in (("params", state.params), ("adam mu", adam_mu(state))):
      x = leaf(tree, path)
      got = norm_spec(x.sharding.spec, x.ndim)
      assert got == want[name], f"{name}: {tree_name} {'/'.join(path)} is sharded {got}, the rules say {want[name]}"
  emb = state.params["language_model"]["embed_tokens"]
  if name == "fsdp4_tensor2":  # each device holds 1/8 of the embedding
    assert emb.addressable_shards[0].data.shape == (emb.shape[0] // 2, emb.shape[1] // 4)


def compare_to_one_device(name: str, new, metrics, ref_state, ref) -> dict:
  """A mesh's step (state after it, metrics) against the one-device step's; asserts they agree."""
  cmp = compare_updates(new, ref_state)
  cmp.update(
    {
      k: abs(float(metrics[k]) - float(ref[k])) / abs(float(ref[k]))
      for k in ("loss", "loss_ar", "loss_fm", "grad_norm")
    }
  )
  assert int(metrics["num_text_targets"]) == int(ref["num_text_targets"])
  for k in ("loss", "loss_ar", "loss_fm", "grad_norm"):
    assert cmp[k] <= 1e-5, (name, k, cmp)
  assert cmp["grad_rel"] <= 1e-5, (name, cmp)
  assert cmp["param_abs_well"] <= 1e-6, (name, cmp)
  return cmp


def main() -> int:
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  config = small_config()
  config.train.batch_size = BATCH
  model = Cheers(state_lib.model_config(config))
  batch = make_batch(0, 0, BATCH, SEQ, IMAGE, TOKENS)
  batch.pop("num_skipped")

  def run(mesh, state, shardings):
    step_fn = step_lib.make_train_step(model, config, mesh, shardings)
    dev = batching.device_batch(batch, batching.batch_shardings(mesh, batch))
    new, metrics = step_fn(state, dev)
    return new, jax.device_get(metrics)

  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  state, shardings = state_lib.init_train_state(config, one)
  initial = jax.device_get(state)
  ref_state, ref = run(one, state, shardings)
  ref_state = jax.device_get(ref_state)

  results = {}
  for name, shape in MESHES.items():
    mesh = sharding.make_mesh(shape)
    _, shardings = state_lib.abstract_train_state(config, mesh)
    if name == "fsdp4_tensor2":  # created sharded by the jitted init, equal to the one-device init
      state, shardings = state_lib.init_train_state(config, mesh)
      check_shardings(state, name)
      same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), state, initial))
      assert all(same), "the sharded init differs from the one-device init"
    else:
      state = jax.device_put(initial, shardings)
    new, metrics = run(mesh, state, shardings)
    check_shardings(new, name)  # the step's out_shardings keep the layout
    results[name] = compare_to_one_device(name, jax.device_get(new), metrics, ref_state, ref)
  print("RESULT " + json.dumps(results), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
