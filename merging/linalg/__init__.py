"""Linear algebra for merging and for its diagnostics.

* ``decompositions``: what the methods share (SVD, top-k singular triplets, eigenpairs, polar
  factors), exact to the official code in float64 and more accurate than a float32 SVD in float32;
* ``lapack``: BLAS/LAPACK routines torch does not expose (syrk, syevr, syevd's steps), from the
  optional ``scipy-openblas32`` wheel through ctypes; without it the same results come from torch;
* ``spectral``: the diagnostics' cheaper spectra (small-side Gram eigendecompositions).

The methods' routines are importable from here: ``from merging.linalg import polar, top_singular``.
"""
from merging.linalg.decompositions import (all_finite, divide_columns, eigh, gram, polar, polar_times,
                                           polar_with_singular_values, svd, top_eigh, top_singular,
                                           top_singular_outside)

__all__ = ["all_finite", "divide_columns", "eigh", "gram", "polar", "polar_times", "polar_with_singular_values", "svd",
           "top_eigh", "top_singular", "top_singular_outside"]
