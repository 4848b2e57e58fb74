"""River-valley loss landscapes, batched over seeds (THEORY.md, "The toy model").

Every landscape works on a batch ``theta`` of shape ``[S, p]`` (S seeds, p = ``dim`` parameters; a 1-D
``[p]`` input is treated as S = 1 and the leading axis is dropped from the output) and shares one protocol:

- ``loss(theta) -> [S]``, ``grad(theta) -> [S, p]``;
- ``river_coordinate(theta) -> [S]`` (u, progress along the river), ``valley_coordinates(theta) -> [S, m]``
  (v, distance from the river floor in each hill direction);
- ``river_direction(theta=None)``: the unit tangent of the river, ``[p]`` when it is constant, ``[S, p]`` at
  the points ``theta`` when it bends;
- ``describe() -> dict``: the formula and where the river is.

Three families:

- :class:`QuadraticRiverValley`: L = −c·u + (μ/2)u² + ½ Σ_i λ_i v_i², optionally rotated by a fixed random
  orthogonal Q so the river is not a coordinate axis;
- :class:`SineRiver` and :class:`HyperbolaRiver`: 2-D rivers whose floor bends, so that straight-line
  extrapolation along a secant eventually leaves the floor;
- :class:`MatrixLeastSquares`: L(W) = ½ tr((W − W*) Σ (W − W*)ᵀ) − c⟨R, W − W*⟩ on a matrix W (for Muon).

The quadratic ones (:class:`QuadraticRiverValley`, :class:`MatrixLeastSquares`) share an eigenbasis
(``to_eigen`` / ``from_eigen``, ``hessian_eigen()``) in which coordinate 0 is the river and 1..p−1 the
valley; the simulator's exact fast path and stationary initialisation work in that basis.
"""

from rivervalley.landscapes.base import Landscape
from rivervalley.landscapes.curved import HyperbolaRiver, SineRiver
from rivervalley.landscapes.quadratic import (
    EigenQuadratic,
    MatrixLeastSquares,
    QuadraticRiverValley,
    flat_then_steep,
)

__all__ = [
    "Landscape",
    "QuadraticRiverValley",
    "SineRiver",
    "HyperbolaRiver",
    "MatrixLeastSquares",
    "flat_then_steep",
    "EigenQuadratic",
]
