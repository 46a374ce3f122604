"""snn-harness: a plugin-based benchmark harness for training spiking neural networks.

Public API::

    from harness import hookimpl, get_registry
    bn = get_registry().normalizers["vanilla_bn"](num_features=64)
"""

from harness.errors import ConfigError, DatasetNotFoundError, HarnessError, IncompatibleCellError, PluginError, UnknownNameError
from harness.hookspecs import hookimpl, hookspec
from harness.registry import Registry, get_plugin_manager, get_registry
from harness.validate import AddedLater, Constraint, Length, Range

__version__ = "0.1.0"
API_VERSION = "1.0"
"""The plugin API's version, ``MAJOR.MINOR`` (docs/plugins.md, "Versions"): the hooks of
``harness.hookspecs``, the step protocol, and the values plugins receive and return. A minor
release only adds (a hook, an optional argument, a field with a default); a major one may remove
or change, after a deprecation of at least one minor release. A plugin declares the API it was
written for with ``SNN_HARNESS_API = "1.0"`` on its plugin object (module or class); it loads
when the major versions agree and its minor is not newer than this one's."""

__all__ = [
    "API_VERSION",
    "AddedLater",
    "ConfigError",
    "DatasetNotFoundError",
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
