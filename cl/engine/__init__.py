"""The training loop, evaluation, checkpoints, run directories, sweeps."""
