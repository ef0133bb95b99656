"""Continual-learning strategies, one file each; importing this package registers them all."""

from strategies import aper, avalanche_baselines, confit, er, er_task_aware, finetune, generative_classifier, joint, l2p, peft_per_task, ranpac, simplecil  # noqa: F401
