"""Backbones (timm), pretraining, frozen-feature cache."""
