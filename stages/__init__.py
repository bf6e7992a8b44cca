"""Built-in stage kinds, installed as ``zpipe.stages``. Topologies name them by short name: python, tvm, merge.

This package imports only from ``zpipe``.
"""

__all__: list[str] = []
