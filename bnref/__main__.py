"""``python -m bnref``: the ``bnref`` command (same arguments, same exit status)."""

from bnref.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
