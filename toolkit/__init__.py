"""TensorFlow/Keras models and Python hooks, served by NVIDIA Triton.

The library is organised as the path a model takes:
spec (``toolkit.spec``, ``toolkit.project``, ``toolkit.dag``) -> repository (``toolkit.render``,
``toolkit.repo``) -> server (``toolkit.server``) -> clients (``toolkit.client``). User code implements
``toolkit.hooks.Hook``; ``toolkit.runtime`` is what runs inside Triton.
"""

__version__ = "0.1.0"
