"""Continual-learning strategies, one file each; importing this package registers them all."""

from strategies import er, finetune, joint, simplecil  # noqa: F401
