"""`python -m cheers_jax.convert orbax-to-hf` on a training workdir (issue 13 item 9)."""

from __future__ import annotations

import jax
import numpy as np

from cheers_jax import config as config_lib
from cheers_jax import convert, sharding
from cheers_jax.checkpoint.hf import load_hf_checkpoint
from cheers_jax.train import checkpointing as ckpt_lib
from cheers_jax.train import state as state_lib


def _workdir_with_random_params(path, steps=(3, 5)):
  """A training workdir whose checkpoints hold random params (steps 3 and 5, each its own values)."""
  config = config_lib.load("tiny")
  abstract, _ = state_lib.abstract_train_state(config, sharding.make_mesh(dict(config.mesh)))
  checkpointer = ckpt_lib.Checkpointer(path, keep=5)
  states = {}
  for step in steps:
    rng = np.random.default_rng(step)
    states[step] = jax.tree.map(
      lambda a: (
        rng.standard_normal(a.shape).astype(a.dtype)
        if np.issubdtype(a.dtype, np.floating)
        else np.zeros(a.shape, a.dtype)
      ),
      abstract,
    )
    checkpointer.save(step, states[step], None, config, force=True)
  checkpointer.close()
  return states


def test_orbax_to_hf_reads_a_training_workdir(tmp_path, capsys):
  """The help said it read training checkpoints but it wanted model_config.json; it now exports a workdir's
  latest step (or WORKDIR/checkpoints/STEP), with the run's own model config, bit for bit in fp32."""
  states = _workdir_with_random_params(tmp_path / "run")
  for source, step in ((tmp_path / "run", 5), (tmp_path / "run" / "checkpoints" / "3", 3)):
    out = tmp_path / f"hf{step}"
    assert convert.main(["orbax-to-hf", "--orbax", str(source), "--out", str(out), "--dtype", "float32"]) == 0
    cfg, variables = load_hf_checkpoint(out)
    assert cfg.text.num_layers == 2 and cfg.vision.image_size == 32  # the tiny run's model
    want, got = jax.tree.leaves(states[step].params), jax.tree.leaves(variables["params"])
    assert len(want) == len(got) and all(np.array_equal(a, b) for a, b in zip(want, got))
  assert "wrote" in capsys.readouterr().out
  assert (
    convert.main(["orbax-to-hf", "--orbax", str(tmp_path / "run" / "checkpoints" / "4"), "--out", str(tmp_path / "x")])
    == 2
  )
  assert "no checkpoint of step 4" in capsys.readouterr().err
  help_text = convert.build_parser()._subparsers._group_actions[0].choices["orbax-to-hf"].format_help()
  assert "training workdir" in help_text
