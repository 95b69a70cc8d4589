"""One process: the memory transforms ``fs.remat`` (+ ``fs.policies``), ``fs.offload``,
``fs.amp`` and ``fs.accumulate``. SPMD transforms live in ``fsharding/parallel/``; precision
and loss scales in ``fsharding/precision.py``.
"""
