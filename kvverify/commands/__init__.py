"""Subcommands of the ``kvverify`` command line (see :mod:`kvverify.cli`)."""
