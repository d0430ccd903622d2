"""submerge's merging library: pure torch + safetensors + fsspec, no web or queue imports.

The public API, what code outside this package imports (``from merging import merge, ...``):

* ``merge`` (→ ``MergeResult``), ``preflight`` (→ ``Preflight``): run a job, or check it without
  reading a tensor;
* ``MergeSpec``, ``load_spec``, ``load_spec_file``: the job spec;
* ``ProgressEvent``, ``ProgressEmitter``: progress reporting and cancellation;
* ``TaskVector``: what an α search (``choose_alpha``) is given;
* ``describe_methods``, ``method_names``, ``get_method``: the registered methods;
* ``IOConfig``: where and how checkpoints are read and outputs written;
* ``MergeError`` (every error has a stable ``code``; subclasses in ``merging.errors``).

In the order a merge runs: ``plan`` (headers, plan, preflight), ``stream`` (tensors through
memory), ``engine`` (``merge``), ``card`` (manifest and model card); ``methods/`` (one module per
method, and the registry), ``linalg/``, ``diagnostics/``, ``io/``.
"""
__version__ = "0.1.0"

from merging.engine import MergeResult, merge  # noqa: E402
from merging.errors import MergeError  # noqa: E402
from merging.io.sources import IOConfig  # noqa: E402
from merging.methods import describe_methods, get_method, method_names  # noqa: E402
from merging.plan import Preflight, preflight  # noqa: E402
from merging.progress import ProgressEmitter, ProgressEvent  # noqa: E402
from merging.spec import MergeSpec, load_spec, load_spec_file  # noqa: E402
from merging.stream import TaskVector  # noqa: E402

__all__ = ["merge", "preflight", "MergeResult", "Preflight", "MergeSpec", "load_spec", "load_spec_file", "ProgressEvent",
           "ProgressEmitter", "TaskVector", "describe_methods", "method_names", "get_method", "IOConfig", "MergeError",
           "__version__"]
