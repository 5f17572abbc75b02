"""Generate with a Cheers checkpoint: chat, ask about an image, text-to-image, edit an image.

  python -m cheers_jax.generate chat --checkpoint HF_DIR --prompt "Tell me a joke"
  python -m cheers_jax.generate chat --checkpoint HF_DIR                 # interactive, multi-turn
  python -m cheers_jax.generate ask  --checkpoint HF_DIR --image cat.png --prompt "Describe this image."
  python -m cheers_jax.generate ask  --checkpoint HF_DIR --image a.png --image photos/ --jsonl   # one batch
  python -m cheers_jax.generate t2i  --checkpoint HF_DIR "a red bicycle" "a lighthouse at dusk" --out out/
  python -m cheers_jax.generate t2i  --checkpoint HF_DIR --prompt-file prompts.txt --batch-size 8 --out out/
  python -m cheers_jax.generate edit --checkpoint HF_DIR --image cat.png --prompt "make it a tiger" --out out/

The model comes from exactly one of: --checkpoint HF_DIR (the published Hugging Face layout), --orbax DIR
(an Orbax export written by `python -m cheers_jax.convert hf-to-orbax`) or --run WORKDIR (the latest
checkpoint of a `python -m cheers_jax.train` run); see `cheers_jax.infer.loader`. Defaults follow the
official scripts: T2I 80 steps, CFG 9.5, shift 0.5, greedy text; I2T temperature 0.3; chat temperature
0.7. Each T2I prompt i uses seed --seed + i, so an image does not depend on the batch it was drawn in.
Images go to --out, which must be empty or new unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cheers_jax import cli
from cheers_jax.checkpoint import orbax as orbax_lib
from cheers_jax.data.images import BadImageError, load_image, preprocess_understanding
from cheers_jax.data.tokenizer import CheersTokenizer, UND_IMAGE_TEXT
from cheers_jax.errors import UserError
from cheers_jax.infer import decode, loader
from cheers_jax.infer import images as images_lib
from cheers_jax.infer.images import make_grid, to_uint8
from cheers_jax.infer.t2i import edit_images, edit_prompt, t2i_prompt, text_to_image

MODEL_SOURCES = ("checkpoint", "orbax", "run")


class CLIError(UserError):
  """A usage problem the user can fix; printed as `error: ...`, exit status 2."""


# ---- model loading -------------------------------------------------------------------------------
def load_model(args, need_generation: bool):
  """-> (Cheers module, variables) from the one source flag given, in the dtype policy of the loader."""
  return loader.load_model(
    **{k: getattr(args, k) for k in MODEL_SOURCES}, dtype=args.dtype, need_generation=need_generation
  )


def _slug(text: str, limit: int = 40) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit] or "image"


def save_images(images: np.ndarray, prompts: Sequence[str], out_dir: Path, first_index: int = 0) -> list[Path]:
  return [
    images_lib.save_png(img, out_dir / f"{first_index + i:04d}_{_slug(prompt)}.png")
    for i, (img, prompt) in enumerate(zip(images, prompts))
  ]


def _read_image(path: str):
  """The --image file decoded (checked before the model loads: a bad file fails in a second)."""
  try:
    return load_image(path)
  except BadImageError as e:
    raise CLIError(f"--image: {e}; give a readable PNG/JPEG/WebP file") from e


def _pixels(img, resolution: int, patch: int) -> np.ndarray:
  return preprocess_understanding(img, resolution=resolution, patch_size=patch).pixel_values.transpose(1, 2, 0)


def _load_source(args, resolution: int, patch: int) -> np.ndarray:
  return _pixels(getattr(args, "source_image", None) or _read_image(args.image), resolution, patch)


# ---- commands ------------------------------------------------------------------------------------
def _check_text(text: Optional[str], what: str = "prompt") -> str:
  if text is None or not text.strip():
    raise CLIError(f'empty {what}: give some text (e.g. --prompt "a red circle")')
  return text


def _sampling(args):
  return decode.SamplingConfig(
    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty
  ).validate()


def _printer(tokenizer, out=sys.stdout):
  """A `stream` callback for one sample: prints the text as it grows."""
  ids: list[int] = []
  shown = [""]

  def show(new: list[np.ndarray]) -> None:
    ids.extend(int(i) for i in new[0])
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
      out.write(text[len(shown[0]) :])
      out.flush()
      shown[0] = text

  return show


def _answer(model, variables, tokenizer, prompts: list[np.ndarray], images, args) -> list[str]:
  stream = _printer(tokenizer) if len(prompts) == 1 and not args.no_stream else None
  ids = decode.generate_text(
    model,
    variables,
    prompts,
    images,
    max_new_tokens=args.max_new_tokens,
    sampling=_sampling(args),
    seed=args.seed,
    max_len=args.max_len,
    stream=stream,
    dummy_seeds=[args.seed + i for i in range(len(prompts))],
  )
  texts = [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
  if stream is None:
    for i, text in enumerate(texts):
      print(f"[{i}] {text}" if len(texts) > 1 else text)
  else:
    print()
  return texts


def cmd_chat(args, model, variables, tokenizer) -> int:
  if args.prompt:
    prompts = [
      tokenizer.build_prompt([{"role": "user", "content": _check_text(p)}], system_prompt=args.system)
      for p in args.prompt
    ]
    _answer(model, variables, tokenizer, prompts, None, args)
    return 0
  history: list[dict] = []
  print("chat: type a message, an empty line or Ctrl-D to quit", file=sys.stderr)
  for line in sys.stdin:
    if not line.strip():
      break
    history.append({"role": "user", "content": line.rstrip("\n")})
    prompt = tokenizer.build_prompt(history, system_prompt=args.system)
    reply = _answer(model, variables, tokenizer, [prompt], None, args)[0]
    history.append({"role": "assistant", "content": reply})
  return 0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def _ask_images(args) -> list[str]:
  """The --image arguments as files: a folder gives its image files (sorted by name)."""
  files = []
  for item in args.image:
    if os.path.isdir(item):
      found = sorted(str(p) for p in Path(item).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
      if not found:
        raise CLIError(f"--image {item!r} is a folder without image files ({', '.join(IMAGE_SUFFIXES)})")
      files += found
    elif os.path.isfile(item):
      files.append(item)
    else:
      raise CLIError(f"image file not found: {item!r}")
  return files


def _ask_sources(args) -> tuple[list[str], list]:
  """The ask images' files and their decoded pictures, read once (in _validate, before the model loads)."""
  if getattr(args, "ask_sources", None) is None:
    files = _ask_images(args)
    args.ask_sources = (files, [_read_image(f) for f in files])
  return args.ask_sources


def cmd_ask(args, model, variables, tokenizer) -> int:
  """Every question about every image, answered in one batched call (image-major order)."""
  cfg = model.cfg
  files, decoded = _ask_sources(args)
  images = [_pixels(img, cfg.vision.image_size, cfg.vision.patch_size) for img in decoded]
  questions = [_check_text(q) for q in (args.prompt or ["Describe this image."])]
  pairs = [(f, i, q) for i, f in enumerate(files) for q in questions]
  prompts = [tokenizer.build_prompt(f"{UND_IMAGE_TEXT}\n{q}", system_prompt=args.system) for _, _, q in pairs]
  if len(pairs) == 1 and not args.jsonl:
    _answer(model, variables, tokenizer, prompts, [[images[0]]], args)  # streamed as it grows
    return 0
  ids = decode.generate_text(
    model,
    variables,
    prompts,
    [[images[i]] for _, i, _ in pairs],
    max_new_tokens=args.max_new_tokens,
    sampling=_sampling(args),
    seed=args.seed,
    max_len=args.max_len,
    dummy_seeds=[args.seed + k for k in range(len(prompts))],
  )
  for (f, _, q), x in zip(pairs, ids):
    answer = tokenizer.decode(x, skip_special_tokens=True).strip()
    if args.jsonl:
      print(json.dumps({"image": f, "prompt": q, "answer": answer}, ensure_ascii=False))
    else:
      print(f"{f}: {answer}" if len(questions) == 1 else f"{f} [{q}]: {answer}")
  return 0


def _flow_kwargs(args) -> dict:
  return dict(
    steps=args.steps,
    cfg_scale=args.cfg,
    alpha=args.shift,
    max_new_tokens=args.max_new_tokens,
    sampling=_sampling(args),
    max_len=args.max_len,
  )


def _report_text(tokenizer, ids_list, offset: int) -> None:
  for i, ids in enumerate(ids_list):
    text = tokenizer.decode(ids[1:], skip_special_tokens=True)  # ids[0] is <im_end>
    if text.strip():
      print(f"[{offset + i}] text after the image: {text}")


def cmd_t2i(args, model, variables, tokenizer) -> int:
  texts = _t2i_texts(args)
  out_dir = Path(args.out)
  all_images, bs = [], args.batch_size
  for start in range(0, len(texts), bs):
    chunk = texts[start : start + bs]
    # pad the last batch to the same shape: no second compile
    padded = chunk + [chunk[-1]] * (min(bs, len(texts)) - len(chunk))
    seeds = [args.seed + start + i for i in range(len(padded))]
    t0 = time.perf_counter()
    res = text_to_image(model, variables, [t2i_prompt(tokenizer, t) for t in padded], seeds=seeds, **_flow_kwargs(args))
    dt = time.perf_counter() - t0
    images = res.images[: len(chunk)]
    paths = save_images(images, chunk, out_dir, start)
    all_images += list(images)
    _report_text(tokenizer, res.generated_ids[: len(chunk)], start)
    for p in paths:
      print(f"saved {p}")
    print(f"[t2i] {len(chunk)} image(s) in {dt:.1f} s", file=sys.stderr)
  if len(all_images) > 1:
    print(f"saved {images_lib.save_png(make_grid(to_uint8(np.stack(all_images))), out_dir / 'grid.png')}")
  return 0


def cmd_edit(args, model, variables, tokenizer) -> int:
  cfg = model.cfg
  source = _load_source(args, cfg.vision.image_size, cfg.vision.patch_size)
  instructions = [_check_text(p) for p in (args.prompt or [])]
  if not instructions:
    raise CLIError('edit needs an instruction: --prompt "make the sky purple"')
  res = edit_images(
    model,
    variables,
    [edit_prompt(tokenizer, t) for t in instructions],
    np.stack([source] * len(instructions)),
    seeds=[args.seed + i for i in range(len(instructions))],
    **_flow_kwargs(args),
  )
  out_dir = Path(args.out)
  for p in save_images(res.images, instructions, out_dir):
    print(f"saved {p}")
  _report_text(tokenizer, res.generated_ids, 0)
  if len(res.images) > 1:
    print(f"saved {images_lib.save_png(make_grid(to_uint8(res.images)), out_dir / 'grid.png')}")
  return 0


def _t2i_texts(args) -> list[str]:
  texts = list(args.prompts or []) + list(args.prompt or [])
  if args.prompt_file:
    try:
      lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
    except OSError as e:
      raise CLIError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
      raise CLIError(f"--prompt-file {args.prompt_file} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    texts += [x.strip() for x in lines if x.strip() and not x.lstrip().startswith("#")]
  if not texts:
    raise CLIError("no prompt: give prompts as arguments, with --prompt, or one per line in --prompt-file")
  for t in texts:
    _check_text(t)
  return texts


# ---- argument parsing ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  src = common.add_argument_group("model")
  cli.add_model_source_flags(src)
  src.add_argument(
    "--max-len",
    type=cli.POSITIVE_INT,
    default=4096,
    help="KV cache length: prompt + image tokens + new tokens must fit (default 4096)",
  )
  src.add_argument("--seed", type=cli.NON_NEGATIVE_INT, default=0, help="random seed (T2I prompt i uses seed + i)")
  txt = common.add_argument_group("text decoding")
  txt.add_argument(
    "--max-new-tokens",
    type=cli.NON_NEGATIVE_INT,
    help="text tokens to generate (chat/ask 256; t2i/edit 0 = none after the image)",
  )
  txt.add_argument(
    "--temperature", type=cli.NON_NEGATIVE, help="<= 1e-6 is greedy (defaults: chat 0.7, ask 0.3, t2i/edit 0)"
  )
  txt.add_argument(
    "--top-p",
    type=cli.number(float, above=0, maximum=1, hint="1 turns it off"),
    default=1.0,
    help="nucleus sampling (1 = off, the reference default)",
  )
  txt.add_argument(
    "--top-k", type=cli.NON_NEGATIVE_INT, default=0, help="top-k sampling (0 = off, the reference default)"
  )
  txt.add_argument(
    "--repetition-penalty",
    type=cli.number(float, above=0, hint="1 turns it off"),
    default=1.0,
    help="1 = off (the reference default)",
  )
  txt.add_argument("--system", default="You are a helpful assistant.", help="system prompt")

  flow = argparse.ArgumentParser(add_help=False)
  g = flow.add_argument_group("image generation")
  g.add_argument(
    "--steps",
    type=cli.number(int, minimum=1, hint="at least 1 denoising step; published default 80"),
    default=None,
    help="Euler steps N (default: a --run's own sample_steps, else the published 80; editing runs int(0.9 N))",
  )
  g.add_argument(
    "--cfg",
    type=cli.number(float, minimum=0, hint="1 turns guidance off"),
    default=None,
    help="classifier-free guidance scale (1 = off; default: a --run's own sample_cfg, else the published 9.5)",
  )
  g.add_argument(
    "--shift",
    type=cli.number(float, above=0, hint="published default 0.5"),
    default=0.5,
    help="time shift a in a t / (1 + (a-1) t) (default 0.5)",
  )
  g.add_argument(
    "--out",
    default="outputs",
    help="output folder for the PNGs (default ./outputs; must be empty or new unless --overwrite)",
  )
  g.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")

  p = cli.ArgumentParser(prog="python -m cheers_jax.generate", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True, metavar="{chat,ask,t2i,edit}")
  c = sub.add_parser("chat", parents=[common], help="text chat (interactive without --prompt)")
  c.add_argument("--prompt", action="append", help="a message; repeat for a batch of independent prompts")
  c.add_argument("--no-stream", action="store_true", help="print the answer at the end instead of as it grows")
  a = sub.add_parser("ask", parents=[common], help="answer questions about an image")
  a.add_argument(
    "--image",
    required=True,
    action="append",
    help="image file or folder of images (repeatable; every image is answered in one batched call)",
  )
  a.add_argument("--prompt", action="append", help="question (repeatable; default 'Describe this image.')")
  a.add_argument("--no-stream", action="store_true", help="print the answer at the end instead of as it grows")
  a.add_argument("--jsonl", action="store_true", help="print one JSON object per answer: image, prompt, answer")
  t = sub.add_parser("t2i", parents=[common, flow], help="text to image")
  t.add_argument("prompts", nargs="*", help="prompts (or use --prompt / --prompt-file)")
  t.add_argument("--prompt", action="append", help="a prompt (repeatable)")
  t.add_argument("--prompt-file", help="text file, one prompt per line ('#' lines skipped)")
  t.add_argument("--batch-size", type=cli.POSITIVE_INT, default=4, help="prompts per batch (default 4)")
  e = sub.add_parser("edit", parents=[common, flow], help="edit an image following an instruction")
  e.add_argument("--image", required=True, help="source image file")
  e.add_argument("--prompt", action="append", help="editing instruction (repeatable: one output each)")
  return p


DEFAULTS = {
  "chat": dict(temperature=0.7, max_new_tokens=256),
  "ask": dict(temperature=0.3, max_new_tokens=256),
  "t2i": dict(temperature=0.0, max_new_tokens=0),
  "edit": dict(temperature=0.0, max_new_tokens=0),
}


PUBLISHED_FLOW = dict(steps=80, cfg=9.5)  # Inference/T2I.py's sampler
RUN_FLOW_KEYS = dict(steps="sample_steps", cfg="sample_cfg")  # the run config's sampler, as its samples used


def _flow_defaults(args) -> dict:
  """The sampler a --run drew its own samples with (its config's sample_steps / sample_cfg: the tiny
  recipe's 8 steps, CFG 2, not the published 80 / 9.5), else the published one."""
  if not getattr(args, "run", None):
    return PUBLISHED_FLOW
  try:
    saved = orbax_lib.load_run_config(*orbax_lib.run_step_dir(args.run))[1]
  except (UserError, OSError, ValueError, KeyError):  # unreadable: the model's load says why, next
    return PUBLISHED_FLOW
  return {k: saved.get(key, PUBLISHED_FLOW[k]) for k, key in RUN_FLOW_KEYS.items()}


def _validate(args) -> None:
  for key, value in DEFAULTS[args.command].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.command in ("t2i", "edit") and (args.steps is None or args.cfg is None):
    for key, value in _flow_defaults(args).items():
      if getattr(args, key) is None:
        setattr(args, key, value)
  # (ranges are the flags' types: cli.number)
  if args.command == "edit" and int(args.steps * 0.9) < 1:
    raise CLIError(f"--steps {args.steps}: editing runs int(0.9 * steps) steps, so give at least 2")
  if args.command == "t2i":
    _t2i_texts(args)
  if args.command == "ask":
    _ask_sources(args)
  if args.command == "edit":
    if not os.path.isfile(args.image):
      raise CLIError(f"image file not found: {args.image!r}")
    args.source_image = _read_image(args.image)
  if args.command in ("t2i", "edit"):
    cli.check_output_dir(args.out, args.overwrite)


COMMANDS = {"chat": cmd_chat, "ask": cmd_ask, "t2i": cmd_t2i, "edit": cmd_edit}


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  _validate(args)
  t0 = time.perf_counter()
  model, variables = load_model(args, args.command in ("t2i", "edit"))
  source = args.checkpoint or args.orbax or args.run
  print(f"loaded {source} ({model.cfg.dtype}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
  return COMMANDS[args.command](args, model, variables, CheersTokenizer())


if __name__ == "__main__":
  sys.exit(main())
