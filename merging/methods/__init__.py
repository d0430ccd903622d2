"""Merge methods, one module each. Importing this package registers all of them."""
from merging.methods import (  # noqa: F401
    breadcrumbs, consensus, dare, esm, iso_c, iso_cts, task_arithmetic, ties, tsv_m, weight_average,
)
