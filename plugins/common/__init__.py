"""Helpers shared by the built-in plugins: segmenters, feature extractors and image preparation.

This is the one package plugins may share (the layer contracts allow it); it imports
``medsynth_core`` and libraries only, never a plugin.
"""
