"""snn-harness: a plugin-based benchmark harness for training spiking neural networks.

Public API::

    from harness import hookimpl, get_registry
    bn = get_registry().normalizers["vanilla_bn"](num_features=64)
"""

from harness.errors import ConfigError, HarnessError, IncompatibleCellError, PluginError, UnknownNameError
from harness.hookspecs import hookimpl, hookspec
from harness.registry import Registry, get_plugin_manager, get_registry
from harness.validate import Constraint, Length, Range

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Constraint",
    "HarnessError",
    "IncompatibleCellError",
    "Length",
    "PluginError",
    "Range",
    "Registry",
    "UnknownNameError",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
    "hookspec",
]
