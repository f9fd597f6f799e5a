"""``python -m trainers``: train, export, evaluate and document detector engines."""

from __future__ import annotations

from trainers.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
