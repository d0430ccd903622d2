"""Merge methods, one module each, and the registry that maps a method id to its class.

Importing this package imports every module in it, and each method module registers its class
(``@register``). So a new method is one module here, a ``MergeMethod`` subclass that declares
what the diagnostics need to know through the hooks of ``base.MergeMethod``, and its test.
"""
import importlib
import pkgutil

from merging.methods.registry import describe_methods, get_method, method_names, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["describe_methods", "get_method", "method_names", "register"]
