"""Continual learning on pretrained timm backbones."""

__version__ = "0.1.0"

import warnings as _warnings

# Avalanche imports qpsolvers, which warns at import time that no QP solver is installed; only
# GEM-style strategies would need one, and the warning would otherwise open every command's output.
_warnings.filterwarnings("ignore", message="no QP solver found")
