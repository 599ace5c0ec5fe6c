"""``python -m capsfus.cli``: the same command line as the ``capsfus`` script."""

from . import main

main()
