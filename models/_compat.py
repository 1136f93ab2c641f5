"""Workarounds for known problems of the stack, each narrow and checked by a test.

``shard_map`` over diffrax solves (equinox's closure-conversion check, diffrax issue 765):
diffrax's recursive-checkpoint adjoint runs equinox's checkpointed while loop, which
closure-converts its body against the loop's initial value and checks every call against that
example by shape, dtype and sharding. Inside ``jax.shard_map`` the values the loop creates carry a
sharding over the manual mesh while the example's is None, so the check fails although shapes and
dtypes agree. :func:`enable_shard_map_solves` makes the check compare shapes and dtypes only
(what it is for: a converted function called with other arrays). It returns False where
equinox's internals differ from the ones patched (a newer equinox); the callers then keep the
layout that needs no ``shard_map``. ``tests/test_layout.py`` solves under ``shard_map`` on forced
CPU devices against one device.
"""

import jax
import jax.tree_util as jtu


_ENABLED: bool | None = None


def enable_shard_map_solves() -> bool:
    """Patch equinox's closure-conversion check once (see the module docstring); True if in place."""
    global _ENABLED
    if _ENABLED is None:
        try:
            import equinox._ad as ad

            original = ad._strip_weak_dtype
            probe = original(jax.ShapeDtypeStruct((2,), "float32", weak_type=True))
            ok = isinstance(probe, jax.ShapeDtypeStruct) and not probe.weak_type and hasattr(ad, "_check_closure_convert_input")
        except (ImportError, AttributeError, TypeError):
            ok = False
        if ok:
            def shapes_and_dtypes(tree):
                return jtu.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)

            ad._strip_weak_dtype = shapes_and_dtypes
        _ENABLED = ok
    return _ENABLED
