"""``python -m clairstat refine ...``: the command line of :mod:`clairstat._cli`."""

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
