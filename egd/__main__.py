"""``python -m egd``: the same as the ``egd`` console script."""

from egd.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
