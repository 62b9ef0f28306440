"""`python -m stinfer` behaves exactly like the `stinfer` console script."""

from stinfer.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
