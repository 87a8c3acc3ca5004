"""``python -m s2dsl`` runs the command line (see ``s2dsl.cli``)."""
import sys

from .cli import main

sys.exit(main())
