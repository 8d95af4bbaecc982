"""Launch CLIs: ``python -m launch node`` (one machine of a job) and ``python -m launch doctor``."""
