"""Training stage 'stage4_sft' of configs/stages.py (its table and how to start it), by file name."""

from configs import stages


def get_config():
  return stages.get_config("stage4_sft")
