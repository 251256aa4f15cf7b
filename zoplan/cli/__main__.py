"""``python -m zoplan.cli``: the ``zoplan`` command."""

from zoplan.cli import main

main(as_program=True)
