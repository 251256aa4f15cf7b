"""``python -m zoplan``: the ``zoplan`` command (as ``python -m zoplan.cli``)."""

from zoplan.cli import main

main()
