"""Launch helpers: ``python -m launch doctor`` (what this process would run as, and why)."""
