"""The parity tool against the oracle: every forward group (and, marked slow, the training groups)."""

from __future__ import annotations

import pytest

from cheers_jax import parity
from tests.oracle import instance_params

FORWARD_GROUPS = "preprocess,vae_encode,vae_decode,siglip,und_projector,time_embed,heads,und,drift"


def run_tool(capsys, instance, groups, golden="golden.npz", dtype="float32"):
  code = parity.main(
    [
      "--checkpoint",
      str(instance / "tiny_ckpt"),
      "--golden",
      str(instance / golden),
      "--groups",
      groups,
      "--dtype",
      dtype,
    ]
  )
  out = capsys.readouterr().out
  last = out.strip().splitlines()[-1]
  return code, out, last


@pytest.mark.parametrize("instance", instance_params())
def test_forward_groups_fp32(capsys, instance):
  code, out, last = run_tool(capsys, instance, FORWARD_GROUPS)
  assert last.startswith("parity: "), out
  passed, total = last.split()[1].split("/")
  assert int(total) >= 45 and passed == total, out  # 47 arrays in the forward groups
  assert code == 0
  assert "FAIL" not in out


@pytest.mark.slow
@pytest.mark.parametrize("instance", instance_params())
def test_train_groups_fp32(capsys, instance):
  code, out, last = run_tool(capsys, instance, "train,train3")
  assert code == 0 and "FAIL" not in out, out
  assert "train.grad_norms" in out and "train3.loss" in out


@pytest.mark.parametrize("instance", instance_params()[:1])
def test_bf16_within_reference_range(capsys, instance):
  """bf16 vs the reference's own bf16 run, within 3x what the reference moves between bf16 and fp32."""
  code, out, last = run_tool(
    capsys, instance, "vae_encode,siglip,und_projector,time_embed,heads,und", golden="golden_bf16.npz", dtype="bfloat16"
  )
  assert code == 0, out


def test_unknown_group_is_an_error(capsys, tmp_path):
  import numpy as np

  np.savez(tmp_path / "x.npz", a=np.zeros(1))
  assert parity.main(["--checkpoint", str(tmp_path), "--golden", str(tmp_path / "x.npz"), "--groups", "nope"]) == 2
  assert "unknown group" in capsys.readouterr().err
