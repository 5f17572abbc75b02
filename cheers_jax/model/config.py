"""Model configuration: explicit frozen values, built from ml_collections or a HF config.json.

The HF `config.json` of the published checkpoint omits many defaults (VAE channels, text depth, ...);
`from_hf_dict` fills them in exactly as the reference config classes do, and `to_hf_dict` writes a
complete file the official code loads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from cheers_jax.errors import ConfigError, unknown_key


class FieldError(ConfigError):
  """A config field holds a value of the wrong type or range; `field` is its dotted name (e.g.
  'text.num_layers'), so a caller can name it as its user wrote it (a config.json key, a --config key)."""

  def __init__(self, field: str, value: Any, wanted: str):
    super().__init__(f"{field}={value!r}: must be {wanted}")
    self.field, self.value, self.wanted = field, value, wanted


def _check_field_values(obj, prefix: str) -> None:
  """Types and ranges of a config dataclass's own fields (not the nested ones): ints are integers
  >= 1, floats finite and > 0, booleans booleans, strings strings, ch_mult a tuple of integers >= 1. A
  string where a number belongs is named here instead of failing later inside arithmetic."""
  for f in dataclasses.fields(obj):
    value, name = getattr(obj, f.name), f"{prefix}{f.name}"
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "int":
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FieldError(name, value, "an integer >= 1")
    elif kind == "float":
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise FieldError(name, value, "a finite number > 0")
    elif kind == "bool":
      if not isinstance(value, bool):
        raise FieldError(name, value, "true or false")
    elif kind == "str":
      if not isinstance(value, str):
        raise FieldError(name, value, "a string")
    elif f.name == "ch_mult":
      if (
        not isinstance(value, tuple)
        or not value
        or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in value)
      ):
        raise FieldError(name, value, "a non-empty list of integers >= 1")


def differences(a: Any, b: Any, ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
  """(dotted field, value in a, value in b) for every field where two (nested) model configurations differ."""

  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out

  fa = flat(a.to_dict() if hasattr(a, "to_dict") else dict(a))
  fb = flat(b.to_dict() if hasattr(b, "to_dict") else dict(b))
  norm = lambda v: tuple(v) if isinstance(v, list) else v
  return [
    (k, fa.get(k), fb.get(k))
    for k in sorted(set(fa) | set(fb))
    if k.split(".")[-1] not in ignore and norm(fa.get(k)) != norm(fb.get(k))
  ]


def describe_differences(diffs: list[tuple[str, Any, Any]], a_name: str, b_name: str) -> str:
  """'text.num_layers: 3 (config) vs 2 (checkpoint), ...' for an error message."""
  return ", ".join(f"{k}: {va!r} ({a_name}) vs {vb!r} ({b_name})" for k, va, vb in diffs)


def _check_keys(cls, values: Mapping[str, Any], where: str, ignore=()) -> None:
  valid = {f.name for f in dataclasses.fields(cls)}
  for key in values:
    if key not in valid and key not in ignore:
      raise ConfigError(unknown_key(f"{where}.{key}", key, valid))


# config.json's names of our fields, where they differ (for error messages)
_OURS_OF_HF = {
  "text": {
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
  },
  "vision": {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads", "vision_use_head": "use_head"},
}


def _float(value: Any) -> Any:
  """A JSON number as float; anything else as it is, for the field checks to name."""
  return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _tuple(value: Any) -> Any:
  return tuple(value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Qwen2.5 decoder."""

  hidden_size: int = 1536
  intermediate_size: int = 8960
  num_layers: int = 28
  num_heads: int = 12
  num_kv_heads: int = 2
  vocab_size: int = 151936
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True

  def __post_init__(self):
    _check_field_values(self, "text.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """SigLIP2 ViT."""

  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_layers: int = 27
  num_heads: int = 16
  patch_size: int = 16
  image_size: int = 512
  layer_norm_eps: float = 1e-6
  use_head: bool = True  # the MAP pooling head: in the checkpoint, unused by Cheers

  def __post_init__(self):
    _check_field_values(self, "vision.")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """FLUX.2-style autoencoder (the encoder and decoder configurations of the reference share these)."""

  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 32
  in_channels: int = 3
  out_ch: int = 3
  resolution: int = 512
  bn_eps: float = 1e-4

  def __post_init__(self):
    _check_field_values(self, "vae.")

  @property
  def latent_channels(self) -> int:
    """Channels after the 2x2 patchify: what the flow matching works in."""
    return 4 * self.z_channels


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  vae: VAEConfig = VAEConfig()
  gen_layers: int = 7  # CFM stage 1 (gen_projector) depth
  hi_layers: int = 3  # CFM stage 2 (hi_projector) depth
  dit_rope_theta: float = 1e4
  max_seq_len: int = 4096  # the reference truncates assembled sequences here
  # Numerics and performance (not part of the checkpoint).
  dtype: str = "bfloat16"  # compute dtype
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"  # none | full | dots | dots_no_batch (see model/layers.py)
  attention: str = "xla"  # xla | cudnn (see model/layers.py)
  # The reference casts two activations to bf16 (the task latent x_t and the projector input).
  # True reproduces that even when computing in fp32; parity in fp32 turns it off.
  reference_bf16_casts: bool = True

  def __post_init__(self):
    _check_field_values(self, "")
    if self.vae.ch != self.vae.latent_channels:
      raise ConfigError(
        f"vae.ch ({self.vae.ch}) must equal 4 * vae.z_channels ({self.vae.latent_channels}): the "
        "hi_projector outputs `ch` channels that are read as the patchified latent"
      )
    if self.text.hidden_size % self.text.num_heads or self.vision.hidden_size % self.vision.num_heads:
      raise ConfigError("hidden_size must be divisible by num_heads (text and vision)")
    if self.vision.num_heads % self.text.num_kv_heads:
      raise ConfigError("vision.num_heads must be divisible by text.num_kv_heads (hi_projector GQA)")

  @property
  def tokens_per_image(self) -> int:
    return (self.vision.grid // 2) ** 2

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  # ---- construction -------------------------------------------------------------------------
  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """From a nested dict / ConfigDict with our own key names; unknown keys are errors."""
    d = dict(d)
    _check_keys(cls, d, "model")
    try:
      sub = {}
      for name, sub_cls in (("text", TextConfig), ("vision", VisionConfig), ("vae", VAEConfig)):
        values = dict(d.pop(name, {}) or {})
        _check_keys(sub_cls, values, f"model.{name}")
        if isinstance(values.get("ch_mult"), (list, tuple)):
          values["ch_mult"] = tuple(values["ch_mult"])
        sub[name] = sub_cls(**values)
      return cls(**sub, **d)
    except FieldError as e:  # named as the user wrote it: model.text.num_layers
      raise FieldError(f"model.{e.field}", e.value, e.wanted) from None

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
    """From the reference `config.json` (UMMConfig nesting), with its omitted defaults filled in."""
    known_top = {
      "vae_encoder_config",
      "vae_decoder_config",
      "vision_representation_config",
      "text_config",
      "architectures",
      "auto_map",
      "model_type",
      "torch_dtype",
      "transformers_version",
      "tie_word_embeddings",
      "_name_or_path",
      "tokenizer_model_max_length",
      "tokenizer_padding_side",
    }
    for key in hf:
      if key not in known_top:
        raise ConfigError(unknown_key(key, key, known_top, noun="config.json key"))
    sections = ("text_config", "vision_representation_config", "vae_encoder_config", "vae_decoder_config")
    for section in sections:  # every published config.json has them (their keys may take defaults)
      if not isinstance(hf.get(section), Mapping):
        raise ConfigError(
          f"no {section} section (a Cheers config.json has all of {', '.join(sections)})"
          if section not in hf
          else f"{section} must be an object, got {hf[section]!r}"
        )
    t, v, enc, dec = (dict(hf[section]) for section in sections)
    for key in ("ch", "ch_mult", "num_res_blocks", "z_channels"):
      if key in enc and key in dec and enc[key] != dec[key]:
        raise ConfigError(
          f"vae_encoder_config.{key}={enc[key]} differs from vae_decoder_config.{key}="
          f"{dec[key]}; cheers-jax assumes one VAE shape"
        )
    try:
      return cls._from_hf_sections(hf, t, v, enc, dec, overrides)
    except FieldError as e:  # named as config.json spells it: text_config.num_hidden_layers
      section, _, field = e.field.partition(".")
      hf_section = {"text": "text_config", "vision": "vision_representation_config"}.get(section)
      hf_key = {v2: k for k, v2 in _OURS_OF_HF.get(section, {}).items()}.get(field, field)
      where = (
        f"{hf_section}.{hf_key}"
        if hf_section
        else (
          f"vae_encoder_config.{field} / vae_decoder_config.{field}"
          if section == "vae"
          else {"max_seq_len": "tokenizer_model_max_length"}.get(e.field, e.field)
        )
      )
      raise ConfigError(f"{where}={e.value!r}: must be {e.wanted}") from None

  @classmethod
  def _from_hf_sections(cls, hf, t, v, enc, dec, overrides) -> "ModelConfig":
    vae_vals = {**enc, **dec}
    text = TextConfig(
      hidden_size=t.get("hidden_size", 1536),
      intermediate_size=t.get("intermediate_size", 8960),
      num_layers=t.get("num_hidden_layers", 28),
      num_heads=t.get("num_attention_heads", 12),
      num_kv_heads=t.get("num_key_value_heads", 2),
      vocab_size=t.get("vocab_size", 151936),
      rope_theta=_float(t.get("rope_theta", 1e6)),
      rms_norm_eps=_float(t.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", t.get("tie_word_embeddings", True))),
    )
    vision = VisionConfig(
      hidden_size=v.get("hidden_size", 1152),
      intermediate_size=v.get("intermediate_size", 4304),
      num_layers=v.get("num_hidden_layers", 27),
      num_heads=v.get("num_attention_heads", 16),
      patch_size=v.get("patch_size", 16),
      image_size=v.get("image_size", 512),
      layer_norm_eps=_float(v.get("layer_norm_eps", 1e-6)),
      use_head=bool(v.get("vision_use_head", True)),
    )
    if "num_patches" in v and v["num_patches"] != vision.grid**2:
      raise ConfigError(f"vision num_patches={v['num_patches']} but (image_size/patch_size)^2 = {vision.grid**2}")
    vae = VAEConfig(
      ch=vae_vals.get("ch", 128),
      ch_mult=_tuple(vae_vals.get("ch_mult", (1, 2, 4, 4))),
      num_res_blocks=vae_vals.get("num_res_blocks", 2),
      z_channels=vae_vals.get("z_channels", 32),
      in_channels=vae_vals.get("in_channels", 3),
      out_ch=vae_vals.get("out_ch", 3),
      resolution=vae_vals.get("resolution", 512),
    )
    return cls(text=text, vision=vision, vae=vae, max_seq_len=hf.get("tokenizer_model_max_length", 4096), **overrides)

  def to_hf_dict(self) -> dict:
    """A complete config.json (every value explicit) in the reference's nesting."""
    vae = self.vae
    vae_common = {
      "resolution": vae.resolution,
      "in_channels": vae.in_channels,
      "ch": vae.ch,
      "ch_mult": list(vae.ch_mult),
      "num_res_blocks": vae.num_res_blocks,
      "z_channels": vae.z_channels,
    }
    t, v = self.text, self.vision
    return {
      "architectures": ["Cheers"],
      "auto_map": {
        "AutoConfig": "configuration_umm.UMMConfig",
        "AutoModel": "modeling_umm.UMMModel",
        "AutoModelForCausalLM": "modeling_umm.Cheers",
      },
      "vae_encoder_config": dict(vae_common),
      "vae_decoder_config": {**vae_common, "out_ch": vae.out_ch},
      "vision_representation_config": {
        "attention_dropout": 0.0,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": v.hidden_size,
        "image_size": v.image_size,
        "intermediate_size": v.intermediate_size,
        "layer_norm_eps": v.layer_norm_eps,
        "model_type": "umm",
        "num_attention_heads": v.num_heads,
        "num_channels": 3,
        "num_hidden_layers": v.num_layers,
        "num_patches": v.grid**2,
        "patch_size": v.patch_size,
      },
      "text_config": {
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "max_window_layers": t.num_layers,
        "sliding_window": 32768,
        "tie_word_embeddings": t.tie_word_embeddings,
        "vocab_size": t.vocab_size,
        "max_position_embeddings": 32768,
        "rope_theta": t.rope_theta,
        "rms_norm_eps": t.rms_norm_eps,
        "hidden_act": "silu",
      },
      "tie_word_embeddings": t.tie_word_embeddings,
      "model_type": "umm",
      "torch_dtype": "bfloat16",
      "transformers_version": "4.51.3",
    }
