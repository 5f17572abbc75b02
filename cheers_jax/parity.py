"""Parity with the official PyTorch code, against a golden set in the oracle's format.

  python -m cheers_jax.parity --checkpoint DIR --golden FILE.npz [--groups a,b] [--dtype float32|bfloat16]

Recomputes every output and intermediate array of the selected groups from the golden's own inputs
and pre-drawn noise, prints (array, shape, max|ours - golden| / scale, tolerance, ok) and ends with
`parity: P/T arrays within tolerance (worst E at NAME)`; exits 0 only when P = T > 0.
Scale = max(1, max|golden|); fp32 tolerance 1e-4 (oracle README); ids and masks exact. In bf16 the
tolerance per array is 3x what the reference itself moves between bf16 and fp32 (the manifest's
`tolerances_observed.bf16_vs_fp32`), and generated/argmax ids are reported, not required.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

from cheers_jax import cli
from cheers_jax import golden as golden_lib
from cheers_jax.errors import UserError


def main(argv=None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  p = cli.ArgumentParser(prog="python -m cheers_jax.parity", description=__doc__)
  p.add_argument("--checkpoint", required=True, help="HF checkpoint directory (the oracle's tiny_ckpt)")
  p.add_argument("--golden", required=True, help="golden .npz (golden.npz for fp32, golden_bf16.npz for bf16)")
  p.add_argument("--manifest", help="golden_manifest.json (default: next to the golden)")
  p.add_argument("--groups", default=",".join(golden_lib.GROUPS), help="comma-separated groups (default: all)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  args = p.parse_args(argv)

  jax.config.update("jax_default_matmul_precision", "highest")
  if not os.path.exists(args.golden):
    raise UserError(f"golden file not found: {args.golden}")
  golden = dict(np.load(args.golden, allow_pickle=False))
  manifest_path = args.manifest or os.path.join(os.path.dirname(os.path.abspath(args.golden)), "golden_manifest.json")
  manifest = json.load(open(manifest_path)) if os.path.exists(manifest_path) else {}
  groups = [x.strip() for x in args.groups.split(",") if x.strip()]
  unknown = [x for x in groups if x not in golden_lib.GROUPS]
  if unknown:
    p.error(f"unknown group(s) {unknown}; choose from {', '.join(golden_lib.GROUPS)}")

  runner = golden_lib.Runner(args.checkpoint, golden, args.dtype)
  rows, skipped = golden_lib.run_groups(runner, groups, golden, manifest, args.dtype)

  width = max([len(r[0]) for r in rows] + [10])
  print(f"{'array':<{width}}  {'shape':<18} {'error':>10} {'tol':>9}  ok")
  for name, shape, err, tol, ok, kind in rows:
    err_s = f"{int(err)} diff" if kind in ("exact", "report") else f"{err:10.2e}"
    tol_s = "exact" if kind == "exact" else ("info" if kind == "report" else f"{tol:9.1e}")
    print(f"{name:<{width}}  {str(tuple(shape)):<18} {err_s:>10} {tol_s:>9}  {'ok' if ok else 'FAIL'}")
  for group, why in skipped:
    print(f"skipped group {group}: {why}")
  passed = sum(r[4] for r in rows)
  floats = [r for r in rows if r[5] == "float"]
  worst = max(floats, key=lambda r: r[2] / r[3]) if floats else None
  worst_s = f"worst {worst[2]:.2e} at {worst[0]}" if worst else "no float arrays"
  print(f"parity: {passed}/{len(rows)} arrays within tolerance ({worst_s})")
  return 0 if rows and passed == len(rows) else 1


if __name__ == "__main__":
  sys.exit(main())
