"""CLI subcommands (see :mod:`ns_plugin.cli`)."""
