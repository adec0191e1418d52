"""DiffuseExpand (Shao et al.): masks from noise, images from masks with segmenter guidance, Dice filter.

Stage I and II train together (``medsynth train diffuseexpand``); Stage III is the mask source
``diffuseexpand-masks`` feeding the generator ``diffuseexpand``; Stage IV is the ``dice-filter``.
"""

from medsynth_core import hookimpl

from .dice_filter import DiceFilter
from .generator import DiffuseExpandGenerator
from .masks import DiffuseExpandMaskSource


@hookimpl
def register_generators(register):
    register("diffuseexpand", DiffuseExpandGenerator)


@hookimpl
def register_mask_sources(register):
    register("diffuseexpand-masks", DiffuseExpandMaskSource)


@hookimpl
def register_filters(register):
    register("dice-filter", DiceFilter)
