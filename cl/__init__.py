"""Continual learning on pretrained timm backbones."""

__version__ = "0.1.0"
