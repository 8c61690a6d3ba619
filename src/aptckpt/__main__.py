"""``python -m aptckpt``: the command line of :mod:`aptckpt.cli`."""

from aptckpt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
