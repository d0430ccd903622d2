"""submerge's merging library: pure torch + safetensors + fsspec, no web or queue imports."""
__version__ = "0.1.0"

from merging.engine import MergeResult, ProgressEvent, merge  # noqa: E402
from merging.errors import MergeError  # noqa: E402
from merging.registry import describe_methods, method_names  # noqa: E402
from merging.spec import MergeSpec, load_spec, load_spec_file  # noqa: E402

__all__ = ["merge", "MergeSpec", "MergeResult", "ProgressEvent", "MergeError", "load_spec", "load_spec_file",
           "describe_methods", "method_names", "__version__"]
