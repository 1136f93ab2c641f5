"""Shared jaxtyping aliases for the model package."""

from jaxtyping import Array, ArrayLike, Bool, Float


RealScalar = Float[Array, ""]
RealScalarLike = float | Float[ArrayLike, ""]
TimeGrid = Float[Array, " n_time"]
BoolScalar = Bool[Array, ""]

__all__ = ["RealScalar", "RealScalarLike", "TimeGrid", "BoolScalar"]
