"""nrrdd: the NRR-DD dataset-distillation driver built on the ``nrrdd_ext`` ops.

A library first: each stage (data, models, teacher training, CIDD, NRR refinement,
relabeling, student evaluation) is a module with a Python API; the ``nrrdd``
command line (``nrrdd.cli``) is a thin layer on top.
"""
__version__ = "0.1.0"
