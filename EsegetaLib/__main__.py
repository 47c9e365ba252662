"""`python -m EsegetaLib ...` is the `esegeta` command."""
import sys

from .cli import main

sys.exit(main())
