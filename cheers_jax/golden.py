"""Recomputing the oracle's golden arrays with this port, and comparing them (the library behind
`python -m cheers_jax.parity`).

`Runner` holds the model (loaded by `cheers_jax.infer.loader`, the inference dtype policy) and the golden
set; each `group_*` recomputes one group's arrays from the golden's own inputs and pre-drawn noise, as
{golden name: our array}. `compare` measures them against the golden: scale = max(1, max|golden|); fp32
tolerance 1e-4; ids and masks exact; in bf16, 3x what the reference itself moves between bf16 and fp32.
"""

from __future__ import annotations

import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cheers_jax.checkpoint.hf import hf_tensor
from cheers_jax.data.images import preprocess_generation, preprocess_understanding
from cheers_jax.data.tokenizer import uncond_ids
from cheers_jax.infer import loader
from cheers_jax.infer.decode import GREEDY, SamplingConfig, generate_text, reference_max_new_tokens
from cheers_jax.infer.t2i import text_to_image
from cheers_jax.model.cfm_head import timestep_features
from cheers_jax.model.cheers import Cheers
from cheers_jax.model.qwen2 import init_cache
from cheers_jax.model.sequence import assemble
from cheers_jax.model.siglip import pixel_shuffle
from cheers_jax.train.loss import cheers_loss

GROUPS = (
  "preprocess",
  "vae_encode",
  "vae_decode",
  "siglip",
  "und_projector",
  "time_embed",
  "heads",
  "und",
  "drift",
  "train",
  "train3",
  "t2i",
  "i2t",
)
FP32_TOLERANCE = 1e-4
I2T_MAX_LENGTH = 6  # the oracle's i2t call: generate(..., max_length=6, temperature=0.0) (manifest "call")


# ---- layout helpers: golden (torch, NCHW) <-> ours (NHWC) ------------------------------------


def nchw_to_nhwc(x):
  return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x):
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


def _stack_ids(ids: list) -> np.ndarray:
  """Per-sample id lists -> (B, longest) int64, right-padded with -1 (the golden stores one sample)."""
  out = np.full((len(ids), max(len(x) for x in ids)), -1, np.int64)
  for b, x in enumerate(ids):
    out[b, : len(x)] = x
  return out


class Runner:
  """Holds the model and variables; each `group_*` returns {golden name: our array}."""

  def __init__(self, checkpoint: str, golden: dict, dtype: str = "float32"):
    self.jax, self.jnp = jax, jnp
    self.model, self.variables = loader.load_hf(checkpoint, dtype)
    self.cfg = self.model.cfg
    self.g = golden
    self.dtype = dtype

  # -- plumbing --
  def apply(self, fn: Callable, *args):
    return self.jax.jit(lambda v, *a: self.model.apply(v, *a, method=fn))(self.variables, *args)

  def f32(self, x):
    return np.asarray(self.jnp.asarray(x, self.jnp.float32))

  @property
  def tokens_per_image(self) -> int:
    return self.cfg.tokens_per_image

  def layout_batch(self, prefix: str, labels: bool = False, t=None):
    g = self.g
    layout = assemble(
      g[f"{prefix}.input_ids"],
      self.tokens_per_image,
      attention_mask=g.get(f"{prefix}.attention_mask"),
      labels=g[f"{prefix}.labels"] if labels else None,
      check_fm_positions=labels,
    )
    pixels = nchw_to_nhwc(g[f"{prefix}.pixel_values"]).astype(np.float32)
    if t is None:
      t = (
        np.asarray(g[f"{prefix}.t"], np.float32).reshape(-1) if f"{prefix}.t" in g else np.ones(len(pixels), np.float32)
      )
    batch = {
      "token_ids": layout.token_ids,
      "image_index": layout.image_index,
      "image_mask": layout.image_mask,
      "valid": layout.valid,
      "positions": layout.positions,
      "pixels": pixels,
      "t": np.asarray(t, np.float32),
      "image_positions": layout.image_positions(self.tokens_per_image),
    }
    return layout, batch

  def logits_summary(self, hidden, prefix: str) -> dict:
    """logits_slice / lse / argmax of hidden @ head, as the golden stores them."""
    logits = self.f32(self.apply(Cheers.logits, hidden))
    ids = self.g["logits_ids"]
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    return {
      f"{prefix}.logits_slice": logits[..., ids],
      f"{prefix}.logits_lse": lse,
      f"{prefix}.logits_argmax": logits.argmax(-1),
    }

  # -- groups --
  def group_preprocess(self):
    img = Image.fromarray(self.g["preprocess.image_uint8"])
    res = self.cfg.vision.image_size
    und = preprocess_understanding(img, resolution=res, patch_size=self.cfg.vision.patch_size)
    gen = preprocess_generation(img, resolution=res, patch_size=self.cfg.vision.patch_size)
    return {
      "preprocess.und.pixel_values": und.pixel_values[None],
      "preprocess.und.grid_hws": np.array([und.grid_hw]),
      "preprocess.gen.pixel_values": gen.pixel_values[None],
    }

  def group_vae_encode(self):
    px = nchw_to_nhwc(self.g["vae_encode.pixels"])
    moments = self.apply(lambda m, x: m.vae_model.encoder(x), px)
    return {
      "vae_encode.moments": nhwc_to_nchw(self.f32(moments)),
      "vae_encode.z": nhwc_to_nchw(self.f32(self.apply(Cheers.encode, px))),
    }

  def group_vae_decode(self):
    z = nchw_to_nhwc(self.g["vae_decode.z"])
    return {
      "vae_decode.vae_model": nhwc_to_nchw(self.f32(self.apply(Cheers.decode, z))),
      "vae_decode.projector": nhwc_to_nchw(self.f32(self.apply(Cheers.decode_projector, z))),
    }

  def group_siglip(self):
    out = {}
    px = nchw_to_nhwc(self.g["siglip.pixels"])
    hidden, pooled = self.apply(Cheers.siglip, px)
    out["siglip.embeddings"] = self.f32(self.apply(Cheers.siglip_embeddings, px))
    out["siglip.last_hidden_state"], out["siglip.pooler_output"] = self.f32(hidden), self.f32(pooled)
    px = nchw_to_nhwc(self.g["siglip.interp.pixels"])
    out["siglip.interp.embeddings"] = self.f32(self.apply(Cheers.siglip_embeddings, px))
    out["siglip.interp.last_hidden_state"] = self.f32(self.apply(Cheers.siglip, px)[0])
    return out

  def group_und_projector(self):
    feats = self.g["und_projector.features"]
    side = int(round(feats.shape[1] ** 0.5))
    return {"und_projector.out": self.f32(self.apply(lambda m, x: m.project(x, side, side), feats))}

  def group_time_embed(self):
    t = self.g["time_embed.t"].reshape(-1)
    e1, e2 = self.apply(Cheers.times, t)
    return {
      "time_embed.freq": self.f32(timestep_features(self.jnp.asarray(t))),
      "time_embed.emb1": self.f32(e1),
      "time_embed.emb2": self.f32(e2),
    }

  def group_heads(self):
    g = self.g

    def run(m, gen_in, t1, t2, high):
      gen_out = m.gen_projector(gen_in, t1)
      side = int(round(gen_in.shape[1] ** 0.5))
      low = pixel_shuffle(gen_out, side, side)
      hi_in, gate = m.hi_gate(low, high)
      return gen_out, low, gate, hi_in, m.hi_projector(hi_in, t2)

    outs = self.apply(run, g["heads.gen_in"], g["heads.t_emb1"], g["heads.t_emb2"], g["heads.hi_high"])
    names = ["heads.gen_out", "heads.hi_low", "heads.hi_gate_values", "heads.hi_gate_out", "heads.hi_out"]
    return {n: self.f32(o) for n, o in zip(names, outs)}

  def group_und(self):
    layout, batch = self.layout_batch("und")
    out = self.apply(Cheers.multimodal, batch, nchw_to_nhwc(self.g["und.x0"]))
    res = {
      "und.hidden": self.f32(out["hidden"]),
      "und.image_mask": layout.image_mask,
      "und.time_embeds_1": self.f32(out["t_emb1"]),
      "und.time_embeds_2": self.f32(out["t_emb2"]),
      "und.omni_mask": np.asarray(out["mask"]).astype(np.int8),
      "und.inputs_embeds": self.f32(out["embeds"]),
      "und.pixel_hat": nhwc_to_nchw(self.f32(out["pixel_hat"])),
      "und.vit_features": self.f32(out["features"]),
      "und.projected": self.f32(out["tokens"]),
    }
    res.update(self.logits_summary(out["hidden"], "und"))
    return res

  def prefill(self, prefix: str, ids, x0, extra: int):
    """Prefill ids (+ the dummy image) into a cache with room for `extra` more tokens."""
    g = dict(self.g)
    g[f"{prefix}.input_ids"] = ids
    saved, self.g = self.g, g
    try:  # t=None in the reference: the prompt's (dummy) image is at t = 1
      layout, batch = self.layout_batch(prefix, t=np.ones(len(g[f"{prefix}.pixel_values"]), np.float32))
    finally:
      self.g = saved
    s = layout.token_ids.shape[1]
    cache = init_cache(self.cfg.text, layout.token_ids.shape[0], s + extra, self.jnp.dtype(self.cfg.dtype))
    out = self.apply(Cheers.prefill, batch, nchw_to_nhwc(x0), cache)
    return layout, out

  def drift_velocity(self, cache, x_t, t, prefix_len: int):
    n = self.tokens_per_image
    b = x_t.shape[0]
    positions = np.broadcast_to(np.arange(prefix_len, prefix_len + n), (b, n))
    kv_mask = np.ones((b, prefix_len + n), bool)
    t = np.full((b,), t, np.float32)
    return self.apply(Cheers.drift, x_t, t, cache, prefix_len, positions, kv_mask)

  def group_drift(self):
    g, n = self.g, self.tokens_per_image
    x_t = nchw_to_nhwc(g["drift.x_t"])
    t = float(g["drift.t"])
    res = {}
    layout, pre = self.prefill("drift", g["drift.input_ids"], g["drift.prefix_x0_cond"], n)
    p = layout.token_ids.shape[1]
    res["drift.prefix_hidden"] = self.f32(pre["hidden"])
    res.update(self.logits_summary(pre["hidden"][:, -1:], "drift.prefix"))
    out = self.drift_velocity(pre["cache"], x_t, t, p)
    res.update(
      {
        "drift.velocity": nhwc_to_nchw(self.f32(out["velocity"])),
        "drift.hi_gate_map": self.f32(out["gate"])[0].reshape(x_t.shape[1], x_t.shape[2]),
        "drift.pixel_hat": nhwc_to_nchw(self.f32(out["pixel_hat"])),
        "drift.projected": self.f32(out["tokens"]),
        "drift.llm_image_hidden": self.f32(out["hidden"]),
        "drift.gen_out": self.f32(out["gen_out"]),
        "drift.hi_input": self.f32(out["hi_input"]),
      }
    )
    ids_u = uncond_ids(g["drift.input_ids"])
    res["drift.uncond_input_ids"] = ids_u
    layout_u, pre_u = self.prefill("drift", ids_u, g["drift.prefix_x0_uncond"], n)
    out_u = self.drift_velocity(pre_u["cache"], x_t, t, layout_u.token_ids.shape[1])
    vc, vu = self.f32(out["velocity"]), self.f32(out_u["velocity"])
    res["drift.velocity_uncond"] = nhwc_to_nchw(vu)
    res["drift.velocity_cfg"] = nhwc_to_nchw(vu + 3.0 * (vc - vu))
    return res

  def group_t2i(self):
    g = self.g
    params = json.loads(str(g["t2i.params"]))
    prompts = [ids[mask.astype(bool)] for ids, mask in zip(g["t2i.input_ids"], g["t2i.attention_mask"])]
    dummies = nchw_to_nhwc(g["t2i.pixel_values"])
    temperature = params.get("temperature", 0.0)
    out = text_to_image(
      self.model,
      self.variables,
      prompts,
      steps=params["num_inference_steps"],
      cfg_scale=params["cfg_scale"],
      alpha=params["alpha"],
      noise=nchw_to_nhwc(g["t2i.z0"]),
      images=[[d] for d in dummies],
      prefix_x0=np.concatenate([nchw_to_nhwc(g["t2i.prefix_x0_cond"]), nchw_to_nhwc(g["t2i.prefix_x0_uncond"])]),
      max_new_tokens=reference_max_new_tokens(params["max_length"], self.tokens_per_image),
      sampling=GREEDY if temperature <= 1e-6 else SamplingConfig(temperature=temperature),
      record=True,
      bucket=1,
    )
    to_nchw = lambda x: np.transpose(x, (0, 1, 4, 2, 3))  # (step, B, h, w, C) -> (step, B, C, h, w)
    return {
      "t2i.step_t": out.step_t,
      "t2i.x_t": to_nchw(out.trace["x_t"]),
      "t2i.v_cond": to_nchw(out.trace["v_cond"]),
      "t2i.v_uncond": to_nchw(out.trace["v_uncond"]),
      "t2i.heat_maps": out.trace["gate"][:, 0],
      "t2i.final_latent": nhwc_to_nchw(out.latent),
      "t2i.image": nhwc_to_nchw(out.image_raw),
      "t2i.generated_ids": _stack_ids(out.generated_ids),
    }

  def group_i2t(self):
    g = self.g
    if not np.all(np.asarray(g["i2t.t"]) == 1.0):
      raise ValueError("i2t with images at t != 1 is not a generation setting this port supports")
    prompts = [ids[mask.astype(bool)] for ids, mask in zip(g["i2t.input_ids"], g["i2t.attention_mask"])]
    pixels = nchw_to_nhwc(g["i2t.pixel_values"])
    per_sample, k = [], 0
    for ids in prompts:  # images are consumed in order across the batch
      n = max(1, int(np.sum((ids == -200) | (ids == -300))))
      per_sample.append(list(pixels[k : k + n]))
      k += n
    ids = generate_text(
      self.model,
      self.variables,
      prompts,
      per_sample,
      max_new_tokens=reference_max_new_tokens(I2T_MAX_LENGTH),
      sampling=GREEDY,
      bucket=1,
      x0=nchw_to_nhwc(g["i2t.x0"]),
    )
    return {"i2t.generated_ids": _stack_ids(ids)}

  def train_group(self, name: str):
    jax = self.jax
    layout, batch = self.layout_batch(name, labels=True)
    batch["image_kind"] = layout.image_kind
    x0 = nchw_to_nhwc(self.g[f"{name}.x0"])
    model = self.model

    def loss_fn(params, batch_stats):
      out = model.apply({"params": params, "batch_stats": batch_stats}, batch, x0, method=Cheers.train_forward)
      kernel = model.apply({"params": params, "batch_stats": batch_stats}, method=Cheers.head_kernel)
      losses = cheers_loss(
        out["hidden"],
        kernel,
        self.jnp.asarray(layout.targets),
        out["velocity"],
        out["u"],
        self.jnp.asarray(layout.image_kind),
      )
      return losses["loss"], (losses, out)

    grads, (losses, out) = jax.jit(jax.grad(loss_fn, has_aux=True))(
      self.variables["params"], self.variables["batch_stats"]
    )
    b, s = layout.token_ids.shape
    n_img, h, w, c = out["velocity"].shape
    res = {
      f"{name}.loss": self.f32(losses["loss"]),
      f"{name}.text_loss": self.f32(losses["loss_ar"]),
      f"{name}.image_loss": self.f32(losses["loss_fm"]),
      f"{name}.velocity": nhwc_to_nchw(self.f32(out["velocity"])),
      f"{name}.target": self.f32(out["u"]).reshape(n_img, h * w, c),
      f"{name}.hidden": self.f32(out["hidden"]),
      f"{name}.text_labels": layout.targets[:, : s - 1].reshape(-1),
      f"{name}.token_ce": self.f32(losses["token_ce"])[:, : s - 1].reshape(-1),
      f"{name}.omni_mask": np.asarray(out["mask"]).astype(np.int8),
      f"{name}.inputs_embeds": self.f32(out["embeds"]),
    }
    sq = {}
    for group, sub in grads.items():
      if group == "language_model":
        for key, leaf in sub.items():
          gname = "language_model.embed_tokens(=lm_head)" if key == "embed_tokens" else "language_model"
          sq[gname] = sq.get(gname, 0.0) + sum(
            float(np.sum(self.f32(x).astype(np.float64) ** 2)) for x in jax.tree_util.tree_leaves(leaf)
          )
      else:
        sq[group] = sum(float(np.sum(self.f32(x).astype(np.float64) ** 2)) for x in jax.tree_util.tree_leaves(sub))
    groups = [str(x) for x in self.g[f"{name}.grad_groups"]]
    res[f"{name}.grad_norms"] = np.sqrt(np.array([sq.get(gname, 0.0) for gname in groups]))
    for key in self.g:
      if key.startswith(f"{name}.grad.model."):
        res[key] = self.f32(hf_tensor({"params": grads}, key[len(f"{name}.grad.") :]))
    return res

  def group_train(self):
    return self.train_group("train")

  def group_train3(self):
    return self.train_group("train3")


def compare(ours: dict, golden: dict, manifest: dict, dtype: str) -> list[tuple]:
  """Rows (name, shape, error, tolerance, ok, kind)."""
  observed = manifest.get("tolerances_observed", {}).get("bf16_vs_fp32", {})
  rows = []
  for name in sorted(ours):
    if name not in golden:
      continue
    ref, got = np.asarray(golden[name]), np.asarray(ours[name])
    if ref.shape != got.shape:
      rows.append((name, ref.shape, float("inf"), 0.0, False, f"shape {got.shape}"))
      continue
    if ref.dtype.kind in "iub":
      mism = int(np.sum(ref != got))
      required = not (dtype == "bfloat16" and ("argmax" in name or "generated" in name))
      rows.append((name, ref.shape, float(mism), 0.0, mism == 0 or not required, "exact" if required else "report"))
      continue
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    err = float(np.max(np.abs(got.astype(np.float64) - ref))) / scale if ref.size else 0.0
    if dtype == "bfloat16":
      tol = max(FP32_TOLERANCE, 3.0 * observed.get(name, {}).get("max_rel_to_max", 0.0))
    else:
      tol = FP32_TOLERANCE
    rows.append((name, ref.shape, err, tol, bool(err <= tol), "float"))
  return rows


def run_groups(
  runner: Runner, groups: list[str], golden: dict, manifest: dict, dtype: str
) -> tuple[list[tuple], list[tuple[str, str]]]:
  """(compare rows of every group, (group, why) of the groups skipped)."""
  rows, skipped = [], []
  for group in groups:
    fn = getattr(runner, f"group_{group}", None)
    if fn is None:
      skipped.append((group, "not implemented yet (arrives with the inference issue)"))
      continue
    if not any(k.startswith(group + ".") for k in golden):
      skipped.append((group, "not in this golden file"))
      continue
    rows += compare(fn(), golden, manifest, dtype)
  return rows, skipped
