"""What decides a cached result: fingerprints of image files, modules and functions.

The extraction cache (:mod:`retrieval_lib.engine.cache`) keys an entry on what decides its
content: the image files (:func:`images_fingerprint`: paths, boxes, sizes, modification
times) and the backbone and pooling themselves -- their class, their settings and a hash of
their parameters and buffers (:func:`module_fingerprint`), never their ``repr``. A plain
function whose state cannot be read (a lambda, a closure) raises :class:`Unkeyable`: it is
computed but not cached.
"""
from __future__ import annotations

import enum
import functools
import hashlib
import os
import types

import numpy as np
import torch
from torch import nn

__all__ = ["images_fingerprint", "module_fingerprint", "fingerprint_or_reason", "Unkeyable"]


def images_fingerprint(images) -> str:
    """Hash of an image list (``.paths``, optional ``.boxes``): paths, boxes, file sizes and
    modification times, so an edited or replaced file gives another hash."""
    h = hashlib.sha1()
    paths = getattr(images, "paths", None)
    if paths is None:
        raise TypeError("caching needs an image list with a .paths attribute (e.g. ImageList)")
    boxes = getattr(images, "boxes", None)
    for i, p in enumerate(paths):
        h.update(str(p).encode())
        try:
            st = os.stat(p)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(b"missing")
        if boxes is not None and boxes[i] is not None:
            h.update(repr(tuple(float(v) for v in boxes[i])).encode())
    return h.hexdigest()


class Unkeyable(Exception):
    """Raised by :func:`module_fingerprint` for an object whose state cannot be read reliably."""


# Attributes every nn.Module has (flags, parameter/buffer/sub-module tables, hooks): not settings.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
# Packages whose classes and functions are keyed by their qualified name alone.
_TRUSTED = ("retrieval_lib", "torch", "torchvision")


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _trusted(obj) -> bool:
    return (getattr(obj, "__module__", None) or "").split(".")[0] in _TRUSTED


def _code_digest(code: types.CodeType, h) -> None:
    """Bytecode, constants and names of a function (nested functions included)."""
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            _code_digest(c, h)
        else:
            h.update(repr(c).encode())


def _class_id(cls: type) -> str:
    """A class's qualified name; for a class outside the library and torch (a notebook's own
    pooling), also a hash of its methods' bytecode, so that editing it makes a new key."""
    name = _qualname(cls)
    if _trusted(cls):
        return name
    h = hashlib.sha1()
    for klass in cls.__mro__:
        if _trusted(klass) or klass is object:
            continue
        for attr, v in sorted(vars(klass).items()):
            f = v.fget if isinstance(v, property) else getattr(v, "__func__", v)
            code = getattr(f, "__code__", None)
            if code is not None:
                h.update(attr.encode())
                _code_digest(code, h)
            elif not attr.startswith("__") and isinstance(v, (bool, int, float, str, tuple, type(None))):
                h.update(f"{attr}={v!r}".encode())
    return f"{name}#{h.hexdigest()[:12]}"


def _tensor_digest(t: torch.Tensor, h) -> None:
    t = t.detach()
    if t.device.type == "meta" or t.is_sparse or t.is_quantized:
        raise Unkeyable(f"a {t.device.type} / sparse / quantized tensor has no readable values")
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _function_id(f) -> str:
    """A named function without captured state, from the library or torch (pure code)."""
    name = _qualname(f)
    if "<" in name or getattr(f, "__closure__", None) or not _trusted(f):
        raise Unkeyable(f"{name} is a plain function (its behaviour may depend on state the "
                        "cache cannot read: a closure, globals, its source)")
    return name


def _canon(v, depth: int = 0) -> str:
    """A stable text for a setting: values, not addresses. Raises Unkeyable when there is none."""
    if depth > 8:
        raise Unkeyable("settings nested too deeply")
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        return repr(v)  # floats: shortest exact repr, never rounded
    if isinstance(v, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(v)
    if isinstance(v, enum.Enum):
        return f"{_qualname(type(v))}.{v.name}"
    if isinstance(v, np.generic):
        return repr(v.item())
    if isinstance(v, (tuple, list)):
        return type(v).__name__ + "(" + ",".join(_canon(x, depth + 1) for x in v) + ")"
    if isinstance(v, (set, frozenset)):
        return "set(" + ",".join(sorted(_canon(x, depth + 1) for x in v)) + ")"
    if isinstance(v, dict):
        return "{" + ",".join(sorted(f"{_canon(k, depth + 1)}:{_canon(x, depth + 1)}"
                                     for k, x in v.items())) + "}"
    if isinstance(v, (torch.Tensor, np.ndarray)):
        h = hashlib.sha1()
        _tensor_digest(torch.as_tensor(v), h)
        return "tensor:" + h.hexdigest()
    if isinstance(v, nn.Module):
        return "module:" + module_fingerprint(v)
    if isinstance(v, type):
        return _class_id(v)
    if isinstance(v, functools.partial):
        return f"partial({_canon(v.func, depth + 1)},{_canon(v.args, depth + 1)},{_canon(v.keywords, depth + 1)})"
    if isinstance(v, types.FunctionType):
        return _function_id(v)
    if isinstance(v, types.BuiltinFunctionType) and (v.__self__ is None or isinstance(v.__self__, types.ModuleType)):
        return _qualname(v)  # a C function such as torch.relu
    if isinstance(v, (types.MethodType, types.BuiltinFunctionType)):
        raise Unkeyable(f"{v!r} is a bound method (its object's state is not read)")
    if hasattr(v, "__dict__") and type(v).__repr__ is object.__repr__:
        return f"{_class_id(type(v))}{_canon(vars(v), depth + 1)}"
    text = repr(v)
    if " at 0x" in text:
        raise Unkeyable(f"{text} shows only an address")
    return f"{_class_id(type(v))}:{text}"


def module_fingerprint(obj) -> str:
    """Hex digest of what decides a module's (or pooling function's) output.

    For an ``nn.Module``: for it and every sub-module, the class (:func:`_class_id`: the
    qualified name, plus a hash of the bytecode for classes outside the library and
    torch), whether it is in training mode, and every setting in its ``__dict__`` (floats
    exactly, never rounded); then every parameter and buffer (dtype, shape and bytes). So
    two WGeM layers that differ only in their attention conv, or two backbones that differ
    only in a setting such as their last activation, get different fingerprints; equal
    layers built anew get the same one.

    For a function: a named function without captured state from the library or torch
    (e.g. ``functional.mac``), or a ``functools.partial`` of one with plain arguments.
    Any other callable object is keyed on its class and ``__dict__``.

    Raises :class:`Unkeyable` when the state cannot be read reliably (a lambda, a closure,
    a function defined in a notebook, a value whose repr is only an address). Hooks are
    not part of the fingerprint.
    """
    h = hashlib.sha1()
    if isinstance(obj, nn.Module):
        for name, sub in obj.named_modules(remove_duplicate=False):
            h.update(f"[{name}:{_class_id(type(sub))}:training={sub.training}]".encode())  # BN, dropout
            for k, v in sorted(vars(sub).items()):
                if k not in _MODULE_INTERNALS:
                    h.update(f"{k}={_canon(v)};".encode())
        for name, t in list(obj.named_parameters(remove_duplicate=False)) + list(
                obj.named_buffers(remove_duplicate=False)):
            h.update(name.encode())
            _tensor_digest(t, h)
    else:
        h.update(_canon(obj).encode())
    return h.hexdigest()


def fingerprint_or_reason(obj) -> tuple[str | None, str]:
    """``(module_fingerprint(obj), "")``, or ``(None, why)`` when ``obj`` is :class:`Unkeyable`."""
    try:
        return module_fingerprint(obj), ""
    except Unkeyable as err:
        return None, str(err)
