"""The fake dataset trees of :mod:`cl.data.fakes`, under the name the tests import."""

from cl.data.fakes import WNIDS, write_cifar, write_cub, write_domainnet, write_image_folder, write_imagenet_variant

__all__ = ["WNIDS", "write_cifar", "write_cub", "write_domainnet", "write_image_folder", "write_imagenet_variant"]
