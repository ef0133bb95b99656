"""Continual-learning strategies, one file each.

Importing this package registers nothing: each strategy is an entry point of the ``cl.strategies``
group (pyproject.toml), and ``STRATEGIES`` imports a strategy's file the first time its name is used.
"""

if __name__ != "cl.strategies":  # the repository root on sys.path would give a second, separate copy of every module
    raise ImportError("import cl.strategies (this folder installs as cl.strategies), not strategies")
