"""Training methods as plug-ins: one module per method, found by name in ``METHODS``.

A method (``alip.methods.base.Method``) owns what it needs from the data (a ``DataSpec``), its
trainable heads (inside its ``encoder``, the module the training step runs and DDP wraps, with
the open_clip model at ``encoder.model``) and its loss terms (its ``criterion``: no parameters,
state buffers such as gate EMAs or memory banks). The training loop and step know no method
names: ``--method NAME`` looks the class up here.
"""
import importlib

from .base import Method, MethodConfigError

# name -> "module:Class" (imported on first use)
METHODS = {
    "clip": "alip.methods.clip:CLIP",
    "alip": "alip.methods.alip:ALIP",
    "slip": "alip.methods.slip:SLIP",
    "declip": "alip.methods.declip:DeCLIP",
    "filip": "alip.methods.filip:FILIP",
    "defilip": "alip.methods.defilip:DeFILIP",
    "clips": "alip.methods.clips:CLIPS",
    "siglip": "alip.methods.siglip:SigLIP",
}


def method_names():
    return tuple(METHODS)


def method_flags():
    """{dest: ("--flag", (names of the methods that read it, ...))} for every method's own
    flags (``Method.own_flags``), in registry order; readers per ``Method.flags_read``."""
    classes = [get_method(name) for name in METHODS]
    flags = {dest: flag for cls in classes for dest, flag in cls.own_flags().items()}
    return {dest: (flag, tuple(c.name for c in classes if dest in c.flags_read()))
            for dest, flag in flags.items()}


def get_method(name):
    """The Method class registered as ``name``."""
    if name not in METHODS:
        raise MethodConfigError(f"--method: unknown method {name!r}; known: {list(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["METHODS", "Method", "MethodConfigError", "get_method", "method_flags", "method_names"]
