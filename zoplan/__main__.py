"""``python -m zoplan``: the ``zoplan`` command (as ``python -m zoplan.cli``)."""

from zoplan.start import main

main()
