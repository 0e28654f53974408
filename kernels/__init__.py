"""Triton kernels of rlkern, installed as ``rlkern.kernels``: one module per op family.

Each module exposes launchers over torch tensors; they are imported lazily by rlkern.ops so
that rlkern imports without triton.
"""
