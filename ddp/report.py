"""``python -m ddp.report``: forwards to ``ddp.reporting.report``."""

from ddp.reporting.report import main

if __name__ == "__main__":
    raise SystemExit(main())
