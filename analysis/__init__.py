"""Analysis: metrics, plots, representational shift, run comparison."""

if __name__ != "cl.analysis":  # the repository root on sys.path would give a second, separate copy of every module
    raise ImportError("import cl.analysis (this folder installs as cl.analysis), not analysis")
