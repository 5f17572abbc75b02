"""Does a model trained on the shapes read and draw? The end-of-training evaluation of the demo.

`run(...)` (called by the training loop when it trains on the shapes, `trains_on_shapes`):
- understanding: greedy captions of held-out shapes (indices past the training set), colour and shape
  accuracy beside the best image-blind answer (`shapes.score_captions`);
- generation: every colour-shape prompt (18) drawn `samples_per_prompt` times (noise seeds 0..), each
  image judged by `shapes.judge_image`; an image is right only if colour and shape are (t2i_both_acc);
- the grid: a row per prompt, each image labelled with the prompt the model read and the judge's
  verdict, to workdir/samples/step_N.png and TensorBoard;
- eval.json in the workdir: the accuracies (fractions), their blind baselines, the step timing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cheers_jax.data import sources
from cheers_jax.data.tokenizer import UND_IMAGE_TEXT, CheersTokenizer
from cheers_jax.demo import shapes
from cheers_jax.infer import images as images_lib
from cheers_jax.infer.decode import GREEDY, generate_text
from cheers_jax.infer.t2i import t2i_prompt, text_to_image

EVAL_KEYS = ("caption_colour_acc", "caption_shape_acc", "t2i_colour_acc", "t2i_shape_acc", "t2i_both_acc")
CAPTION_IMAGES = 288  # 96 left +-4.5 points of binomial noise on a 75 % figure; 288, +-2.6 (~10 s more)
SAMPLES_PER_PROMPT = 8


def trains_on_shapes(config) -> bool:
  """Whether `config` trains on the shapes demo (data.source 'synthetic' and no data.sources list)."""
  return config.data.source == "synthetic" and not tuple(config.data.get("sources", None) or ())


def _variables(state) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def draw(model, state, config, prompt_texts: Sequence[str]) -> np.ndarray:
  """(N, H, W, 3) in [0, 1]: T2I of each full prompt text (noise seeds 0..), the config's sampler settings."""
  tok = CheersTokenizer()
  ids = [t2i_prompt(tok, text) for text in prompt_texts]
  out = text_to_image(
    model,
    _variables(state),
    ids,
    steps=int(config.sample_steps),
    cfg_scale=float(config.sample_cfg),
    seeds=list(range(len(ids))),
  )
  return np.asarray(out.images)


def evaluate_captions(model, state, config, num_images: int = CAPTION_IMAGES) -> dict:
  """Greedy captions of `num_images` held-out shapes, scored against chance and the image-blind best."""
  size, image_size, seed = int(config.data.synthetic_size), int(config.data.image_size), int(config.seed)
  held_out = [shapes.sample_shape(seed, i) for i in range(size, size + num_images)]  # never trained on
  tok = CheersTokenizer()
  prompt = tok.build_prompt(UND_IMAGE_TEXT + "\n" + sources.I2T_PROMPT)
  images = [[shapes.render(s, image_size).astype(np.float32) / 255.0] for s in held_out]
  outs = generate_text(model, _variables(state), [prompt] * num_images, images, max_new_tokens=8, sampling=GREEDY)
  texts = [tok.decode(ids, skip_special_tokens=True).strip() for ids in outs]
  wanted = [s.label for s in held_out]
  scores = shapes.score_captions(wanted, texts)
  examples = [f"{shapes.describe(w)!r} -> {t!r}" for w, t in zip(wanted[:6], texts)]
  return {**scores, "num_images": num_images, "examples": examples}


def evaluate_generation(
  model, state, config, samples_per_prompt: int = SAMPLES_PER_PROMPT
) -> tuple[dict, list[np.ndarray], list[shapes.ShapeLabel]]:
  """Every colour-shape prompt drawn `samples_per_prompt` times and judged: (scores, images, wanted)."""
  wanted = [label for label in shapes.all_labels() for _ in range(samples_per_prompt)]
  images = list(draw(model, state, config, [sources.shapes_prompt(shapes.describe(w)) for w in wanted]))
  return shapes.score_generations(wanted, images), images, wanted


def labelled_grid(
  images: Sequence[np.ndarray], wanted: Sequence[tuple[str, str]], columns: int, scale: int = 5, font_size: int = 13
) -> np.ndarray:
  """uint8 grid, `columns` images a row: each image enlarged `scale` times (nearest), under it the prompt
  the model read ('A RED CIRCLE') and the judge's verdict (green when colour and shape are right)."""
  font = ImageFont.load_default(size=font_size)  # Pillow's scalable font (>= 10.1)
  h, w = np.asarray(images[0]).shape[:2]
  cell_w, cell_h, line, pad = w * scale, h * scale, font_size + 3, 6
  rows = -(-len(images) // columns)
  canvas = Image.new("RGB", (columns * (cell_w + pad) + pad, rows * (cell_h + 2 * line + pad) + pad), (255,) * 3)
  draw_ = ImageDraw.Draw(canvas)
  for i, (img, want) in enumerate(zip(images, wanted)):
    r, c = divmod(i, columns)
    x, y = pad + c * (cell_w + pad), pad + r * (cell_h + 2 * line + pad)
    arr = np.asarray(img)
    arr = arr if arr.dtype == np.uint8 else images_lib.to_uint8(arr)
    canvas.paste(Image.fromarray(arr).resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
    draw_.text((x, y + cell_h + 1), shapes.prompt_text(shapes.describe(want)), fill=(0, 0, 0), font=font)
    colour, shape = shapes.judge_image(arr)
    verdict = f"judged: {colour or 'no colour'} {shape or 'no shape'}"
    right = (colour, shape) == tuple(want)
    draw_.text((x, y + cell_h + line), verdict, fill=(0, 130, 0) if right else (200, 0, 0), font=font)
  return np.asarray(canvas)


def eval_summary(caption: Optional[dict], generation: Optional[dict], timing: Optional[dict] = None) -> dict:
  """The eval.json content: the accuracies (fractions) and their image-/prompt-blind baselines."""
  out: dict = {}
  if caption is not None:
    out.update(
      caption_colour_acc=caption["colour_acc"],
      caption_shape_acc=caption["shape_acc"],
      caption_both_acc=caption["both_acc"],
      caption_colour_blind=caption["majority_colour"],
      caption_shape_blind=caption["majority_shape"],
      caption_well_formed=caption["well_formed"],
      caption_images=caption["num_images"],
    )
  if generation is not None:
    out.update({k: v for k, v in generation.items() if k.startswith("t2i_")})
  if timing:
    out["timing_s"] = dict(timing)
  return out


def write_eval(path: Path, summary: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def caption_report(ev: dict) -> str:
  """One paragraph a person can judge: the template (well-formed), then image reading against chance."""
  return (
    f"held-out synthetic captions ({ev['num_images']} images, greedy): well-formed {ev['well_formed']:.0%}, "
    f"{int(ev['distinct'])} distinct; colour {ev['colour_acc']:.0%} (chance {ev['colour_chance']:.0%}, "
    f"blind best {ev['majority_colour']:.0%}), shape {ev['shape_acc']:.0%} (chance {ev['shape_chance']:.0%}, "
    f"blind best {ev['majority_shape']:.0%}), both {ev['both_acc']:.0%} (chance {ev['both_chance']:.1%}, "
    f"blind best {ev['majority_both']:.0%})"
  )


def generation_report(ev: dict) -> str:
  return (
    f"text-to-image ({ev['t2i_images']} images, 18 prompts): colour {ev['t2i_colour_acc']:.0%} "
    f"(prompt-blind {ev['t2i_colour_blind']:.0%}), shape {ev['t2i_shape_acc']:.0%} "
    f"(prompt-blind {ev['t2i_shape_blind']:.0%}), both {ev['t2i_both_acc']:.0%} "
    f"(prompt-blind {ev['t2i_both_blind']:.1%})"
  )


def run(
  model,
  state,
  config,
  workdir: Path,
  step: int,
  writer=None,
  *,
  captions: bool = True,
  generation: bool = True,
  timing: Optional[dict] = None,
) -> dict:
  """The demo's evaluation of a trained state: captions and/or generation as asked, the grid, eval.json
  and TensorBoard scalars (process 0 writes). Returns the eval.json content (plus 'grid' and
  'caption_examples' when made). Every process runs the model (SPMD over the global params)."""
  lead = jax.process_index() == 0
  caption_ev = generation_ev = None
  extra: dict = {}
  if generation:
    generation_ev, images, wanted = evaluate_generation(model, state, config)
    if lead:
      print(generation_report(generation_ev), flush=True)
      grid = labelled_grid(images, wanted, columns=SAMPLES_PER_PROMPT)
      path = Path(workdir) / "samples" / f"step_{step:07d}.png"
      images_lib.save_png(grid, path)
      extra["grid"] = str(path)
      if writer is not None:
        writer.write_images(step, {"samples": grid})
  if captions:
    caption_ev = evaluate_captions(model, state, config)
    extra["caption_examples"] = caption_ev["examples"]
    if lead:
      print(caption_report(caption_ev) + "\n  " + "\n  ".join(caption_ev["examples"]), flush=True)
  summary = eval_summary(caption_ev, generation_ev, timing)
  if lead and (caption_ev or generation_ev):
    write_eval(Path(workdir) / "eval.json", summary)
    if writer is not None:
      writer.write_scalars(step, {f"eval/{k}": v for k, v in summary.items() if isinstance(v, float)})
  return {**summary, **extra}
