"""Subcommands of `esegeta`, one module each (see EsegetaLib/cli.py for the protocol)."""
