"""``python -m kpy`` runs the command line."""

from kpy.cli import main

main()
