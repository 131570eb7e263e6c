"""Triton kernels of pyvae, installed as ``pyvae.kernels`` (one module per op family).

Importing a module here needs Triton; ``pyvae.backends`` decides whether it can be used.
"""
