"""The plugins that ship with medsynth, one subpackage per technique.

Each is found through the ``medsynth`` entry-point group, exactly like a third-party plugin.
Plugins never import one another; shared code lives in ``medsynth_core``.
"""
