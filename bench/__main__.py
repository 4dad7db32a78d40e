"""``python -m bench``: the same as the ``bench`` console script."""

from bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
