"""Continual-learning strategies, one file each.

Importing this package registers nothing: each strategy is an entry point of the ``cl.strategies``
group (pyproject.toml), and ``STRATEGIES`` imports a strategy's file the first time its name is used.
"""
