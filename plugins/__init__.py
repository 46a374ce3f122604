"""The built-in plugins of snn-harness, installed as ``snn_harness_plugins``.

Each module is registered through the ``snn_harness`` entry-point group, exactly like a third
party's plugin: there is no other way in.
"""
