"""Analysis: metrics, plots, representational shift, run comparison."""
