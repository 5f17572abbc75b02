"""Training stage 'stage2_pretrain' of configs/stages.py (its table and how to start it), by file name."""

from configs import stages


def get_config():
  return stages.get_config("stage2_pretrain")
