"""The ``medsynth`` command line: a Typer app over medsynth_core and the installed plugins."""
