"""Datasets and continual-learning streams."""

from cl.data.benchmark import Benchmark, Experience, Split, build_benchmark

__all__ = ["Benchmark", "Experience", "Split", "build_benchmark"]
