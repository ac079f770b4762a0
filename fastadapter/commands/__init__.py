"""Subcommands of the ``fastadapter`` CLI (see :mod:`fastadapter.cli`): one module per command."""
