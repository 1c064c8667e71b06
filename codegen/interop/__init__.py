"""symgrad's generated ops inside other frameworks: ``torch.py`` (``op.torch()``) and
``jax.py`` (``op.jax()``).

Library code shared by every generated module, the library's and a user's alike: it
knows the ``Op`` interface (``forward``, ``backward``, ``shapes``, ``on``) and nothing of
any particular op. torch and jax are optional: each module imports its framework, and
``Op.torch()`` / ``Op.jax()`` import the module on first use only.
"""


def reject(op, framework: str):
    """Optimizers and schedules are not functions to differentiate: a clear TypeError."""
    if op.kind == "optimizer":
        raise TypeError(
            "%s is an optimizer (an in-place update of parameters), not a %s function: call "
            "op.step(p, g, *state, t=t) on NumPy arrays, or use the framework's own optimizers" % (op.name, framework))
    if op.kind == "schedule":
        raise TypeError("%s is a learning-rate schedule, not a %s function: call op.lr(t)" % (op.name, framework))
    if "forward" not in op._funcs:
        raise TypeError("%s (%s) has no forward to wrap as a %s function" % (op.name, op.kind, framework))
    if "shapes" not in op._funcs:
        raise TypeError("%s: its module was generated without a shapes function (an older symgrad); "
                        "regenerate it (python -m codegen, or codegen.build) to use it in %s" % (op.name, framework))


def qualified_name(op) -> str:
    """A deterministic, unique name for the op with these attributes: the module that
    holds it (``generated.activations.elu``, or a user's module and its file), the op's
    name and its attribute values, as ``<group>_<op>_<digest>``."""
    import hashlib

    import os
    import sys

    module = op._funcs["forward"].__module__
    path = getattr(sys.modules.get(module), "__file__", None) or ""
    where = module if module.startswith("generated.") else "%s:%s" % (module, os.path.realpath(path))
    key = "%s:%s:%s" % (where, op.name, sorted(op.attrs.items()))
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    parts = module.split(".")
    group = parts[1] if parts[0] == "generated" and len(parts) > 2 else parts[-1]
    name = "%s_%s_%s" % (group, op.name, digest) if group != op.name else "%s_%s" % (op.name, digest)
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)
