"""Sympy derivations that check the identities of THEORY.md instead of trusting them.

Each ``check_*`` / ``derive_*`` function re-derives one result from its definition (a brute-force sum, an
integral, a variance expansion) and compares it with the closed form used in :mod:`rivervalley.theory`.
It returns True, or raises ``AssertionError`` naming the case that disagrees. Sizes are kept small so the
whole set runs in seconds:

    python -m rivervalley.symbolic
"""

from __future__ import annotations

import sys
import time

import sympy as sp

__all__ = [
    "gain_closed_form",
    "cross_closed_form",
    "check_sma_gain",
    "check_sma_gain_general_k",
    "check_sma_cross",
    "check_window_sum_series",
    "check_ema_gain",
    "check_lags",
    "derive_delta_loss_quadratic",
    "check_extra_weights_identity",
    "check_optimal_weights",
    "check_curved_river",
    "check_decay_average",
    "run_all",
    "main",
]

rho, alpha, beta = sp.symbols("rho alpha beta")


def _is_zero(expr) -> bool:
    return sp.simplify(sp.cancel(sp.together(expr))) == 0


def _require_equal(lhs, rhs, what: str) -> None:
    if not _is_zero(lhs - rhs):
        raise AssertionError(f"{what}: {sp.simplify(lhs)} != {sp.simplify(rhs)}")


def _generic_branch(expr):
    """Replace each Piecewise by its generic branch: drop special points Eq(ρ, 1) and unevaluated sums."""

    def pick(pw):
        for value, cond in pw.args:
            if isinstance(cond, sp.Eq) or value.has(sp.Sum):
                continue
            return value
        raise AssertionError(f"no generic branch in {pw}")

    return expr.replace(lambda e: isinstance(e, sp.Piecewise), pick)


def _window_sum_brute(K: int, d: int, r=rho):
    """S_d = Σ_{j,l=0}^{K−1} r^{|d+l−j|}: covariance sum of two K-windows whose ends are d apart."""
    return sum(r ** abs(d + l - j) for j in range(K) for l in range(K))


def gain_closed_form(K, r=rho):
    """G_K(ρ) = (1+ρ)/(K(1−ρ)) − 2ρ(1−ρ^K)/(K²(1−ρ)²)  (THEORY.md §b)."""
    return (1 + r) / (K * (1 - r)) - 2 * r * (1 - r**K) / (K**2 * (1 - r) ** 2)


def cross_closed_form(K, d, r=rho, branch: str = "auto"):
    """C_d = S_d/K² with the two branches of THEORY.md §b: 'overlap' (0 ≤ d ≤ K), 'disjoint' (d ≥ K−1)."""
    if branch == "auto":
        branch = "disjoint" if d >= K - 1 else "overlap"
    if branch == "overlap":
        S = (K - d) * (1 + r) / (1 - r) + (
            r ** (K - d + 1) * (1 - r**d) ** 2 - 2 * r ** (d + 1) * (1 - r ** (K - d))
        ) / (1 - r) ** 2
    else:
        S = r ** (d - K + 1) * (1 - r**K) ** 2 / (1 - r) ** 2
    return S / K**2


# ---------------------------------------------------------------------------------------------------------
# §b


def check_sma_gain(K_max: int = 6) -> bool:
    """G_K(ρ) closed form == (1/K²) Σ_{j,l<K} ρ^{|j−l|} as rational functions of ρ, K = 1..K_max."""
    for K in range(1, K_max + 1):
        _require_equal(gain_closed_form(K), _window_sum_brute(K, 0) / K**2, f"G_K closed form, K={K}")
        _require_equal(gain_closed_form(K, 0), sp.Rational(1, K), f"G_K(0) = 1/K, K={K}")
    return True


def check_sma_gain_general_k() -> bool:
    """Derive G_K for symbolic K: (1/K²)[K + 2 Σ_{h=1}^{K−1} (K−h) ρ^h] equals the §b closed form."""
    K = sp.Symbol("K", integer=True, positive=True)
    h = sp.Symbol("h", integer=True)
    derived = (K + 2 * _generic_branch(sp.summation((K - h) * rho**h, (h, 1, K - 1)))) / K**2
    _require_equal(derived, gain_closed_form(K), "G_K for symbolic K")
    if sp.limit(gain_closed_form(K), rho, 1) != 1:
        raise AssertionError("G_K(ρ) should tend to 1 as ρ → 1")
    return True


def check_sma_cross(K_max: int = 5, d_max: int = 7) -> bool:
    """Both branches of C_d == brute-force Σ_{j,l} ρ^{|d+l−j|}/K² wherever they apply (THEORY.md §b)."""
    for K in range(1, K_max + 1):
        for d in range(d_max + 1):
            brute = _window_sum_brute(K, d) / K**2
            if d <= K:
                _require_equal(cross_closed_form(K, d, branch="overlap"), brute, f"C_d overlap, K={K} d={d}")
            if d >= K - 1:
                _require_equal(
                    cross_closed_form(K, d, branch="disjoint"), brute, f"C_d disjoint, K={K} d={d}"
                )
        _require_equal(cross_closed_form(K, 0), gain_closed_form(K), f"C_0 = G_K, K={K}")
    return True


def check_window_sum_series(K_max: int = 5, d_max: int = 7) -> bool:
    """The exact ε-expansion that theory.py uses near ρ = 1 (ε = 1 − ρ), for every d ≥ 0:

    S_d = K² + Σ_{m≥1} (−ε)^m M_m,  M_m = C(d+K+1, m+2) − 2C(d+1, m+2) + [d ≥ K] C(d−K+1, m+2)
                                          + [d ≤ K] C(K−d+1, m+2).
    """
    eps = sp.Symbol("epsilon")
    for K in range(1, K_max + 1):
        for d in range(d_max + 1):
            moment = lambda m, K=K, d=d: (
                sp.binomial(d + K + 1, m + 2)
                - 2 * sp.binomial(d + 1, m + 2)
                + (sp.binomial(d - K + 1, m + 2) if d >= K else 0)
                + (sp.binomial(K - d + 1, m + 2) if d <= K else 0)
            )
            series = K**2 + sum((-eps) ** m * moment(m) for m in range(1, K + d + 1))
            _require_equal(
                sp.expand(_window_sum_brute(K, d, 1 - eps)), series, f"S_d near rho=1, K={K} d={d}"
            )
    return True


def check_ema_gain(order: int = 8) -> bool:
    """G_EMA = (1−β)(1+βρ)/((1+β)(1−βρ)) from Var[(1−β) Σ_j β^j x_{k−j}]/V (THEORY.md §b).

    Derived with sympy's geometric sums: (1−β)² Σ_j β^{2j} [1 + 2 Σ_{h≥1} (βρ)^h]; cross-checked against
    the truncated double sum (1−β)² Σ_{j,l≤order} β^{j+l} ρ^{|j−l|} to that order in β.
    """
    h = sp.Symbol("h", integer=True, nonnegative=True)
    closed = (1 - beta) * (1 + beta * rho) / ((1 + beta) * (1 - beta * rho))
    diagonal = _generic_branch(sp.summation(beta ** (2 * h), (h, 0, sp.oo)))
    off = _generic_branch(sp.summation((beta * rho) ** h, (h, 1, sp.oo)))
    _require_equal((1 - beta) ** 2 * diagonal * (1 + 2 * off), closed, "EMA gain derivation")
    truncated = (1 - beta) ** 2 * sum(
        beta ** (j + l) * rho ** abs(j - l) for j in range(order + 1) for l in range(order + 1)
    )
    difference = sp.series(closed - truncated, beta, 0, order + 1).removeO()
    if sp.expand(difference) != 0:
        raise AssertionError(f"EMA gain disagrees with the double sum below beta^{order + 1}: {difference}")
    _require_equal(closed.subs(rho, 1), 1, "EMA gain at rho = 1")
    return True


# ---------------------------------------------------------------------------------------------------------
# §c, §d


def check_lags() -> bool:
    """SMA trails the newest checkpoint by D(K−1)/2, a stationary EMA by Dβ/(1−β) (THEORY.md §c)."""
    K = sp.Symbol("K", integer=True, positive=True)
    j = sp.Symbol("j", integer=True, nonnegative=True)
    D = sp.Symbol("D")
    _require_equal(sp.summation(j * D, (j, 0, K - 1)) / K, D * (K - 1) / 2, "SMA lag")
    ema = _generic_branch(sp.summation((1 - beta) * beta**j * j * D, (j, 0, sp.oo)))
    _require_equal(ema, D * beta / (1 - beta), "EMA lag")
    return True


def derive_delta_loss_quadratic() -> bool:
    """Derive ΔL(α) of THEORY.md §d from its ingredients and match R − Pα − B + 2Wα(1+α).

    River: E u_j = u_0 + D j (D = ηcs), M_k the SMA of checkpoints k−K+1..k, E_k = (1+α)M_k − αM_{k−d}.
    Valley i: Var v̄ = V_i G_i, Cov(v̄_k, v̄_{k−d}) = V_i C_i. Loss −c·u + Σ ½λ_i v_i², relative to θ^(k).
    Also checks α*, ΔL(α*), α_match and the two gaps behind the strict-improvement condition.
    """
    c, eta, s, u0 = sp.symbols("c eta s u0")
    K, d, k = sp.symbols("K d k", integer=True, positive=True)
    j = sp.Symbol("j", integer=True, nonnegative=True)
    D = eta * c * s
    mean_u = lambda step: u0 + D * step
    sma_mean = lambda end: sp.summation(mean_u(end - j), (j, 0, K - 1)) / K
    river = sp.simplify((1 + alpha) * sma_mean(k) - alpha * sma_mean(k - d))
    _require_equal(river, mean_u(k) - D * (K - 1) / 2 + alpha * D * d, "E u(E_k)")

    valleys = 2
    lam, V, G, C = (sp.symbols(f"{name}1:{valleys + 1}") for name in ("lambda", "V", "G", "C"))
    valley_loss = 0
    for i in range(valleys):
        var = (1 + alpha) ** 2 * V[i] * G[i] + alpha**2 * V[i] * G[i] - 2 * alpha * (1 + alpha) * V[i] * C[i]
        _require_equal(var, V[i] * (G[i] + 2 * (G[i] - C[i]) * alpha * (1 + alpha)), "valley variance")
        valley_loss += lam[i] / 2 * (var - V[i])
    delta = -c * (river - mean_u(k)) + valley_loss

    omega = [lam[i] * V[i] / 2 for i in range(valleys)]
    R = c**2 * eta * s * (K - 1) / 2
    P = c**2 * eta * s * d
    B = sum(omega[i] * (1 - G[i]) for i in range(valleys))
    W = sum(omega[i] * (G[i] - C[i]) for i in range(valleys))
    _require_equal(delta, R - P * alpha - B + 2 * W * alpha * (1 + alpha), "ΔL(α) quadratic")

    (a_star,) = sp.solve(sp.diff(delta, alpha), alpha)
    _require_equal(a_star, (P - 2 * W) / (4 * W), "α*")
    _require_equal(delta.subs(alpha, a_star), R - B - (P - 2 * W) ** 2 / (8 * W), "ΔL(α*)")
    _require_equal(
        delta.subs(alpha, 0) - delta.subs(alpha, a_star), (P - 2 * W) ** 2 / (8 * W), "gain vs M_k"
    )
    a_match = (K - 1) / (2 * d)
    _require_equal(river.subs(alpha, a_match), mean_u(k), "α_match puts the river at θ^(k)")
    _require_equal(delta.subs(alpha, a_match), -B + 2 * W * a_match * (1 + a_match), "ΔL(α_match)")
    return True


def check_extra_weights_identity(K_max: int = 3, d_max: int = 3) -> bool:
    """§d' reproduces §d: for the Extra-Merge weight vector over N = K+d checkpoints,
    wᵀΓw = G + 2(G − C_d)α(1+α) (closed forms of §b) and lag(w) = N − tᵀw = (K−1)/2 − αd."""
    for K in range(1, K_max + 1):
        for d in range(1, d_max + 1):
            n = K + d
            now = [sp.Rational(1, K) if i >= n - K else 0 for i in range(n)]
            before = [sp.Rational(1, K) if n - d - K <= i < n - d else 0 for i in range(n)]
            w = sp.Matrix([(1 + alpha) * a - alpha * b for a, b in zip(now, before, strict=True)])
            gamma = sp.Matrix(n, n, lambda i, l: rho ** abs(i - l))
            G, C = gain_closed_form(K), cross_closed_form(K, d)
            _require_equal((w.T * gamma * w)[0], G + 2 * (G - C) * alpha * (1 + alpha), f"wᵀΓw, K={K} d={d}")
            lag = n - sum((i + 1) * w[i] for i in range(n))
            _require_equal(lag, sp.Rational(K - 1, 2) - alpha * d, f"lag(w), K={K} d={d}")
            _require_equal(sum(w), 1, f"sum of weights, K={K} d={d}")
    return True


def check_optimal_weights(n: int = 3) -> bool:
    """§d' optimum: solving the KKT system of min p(N − tᵀw) + wᵀQw s.t. 1ᵀw = 1 gives
    w = Q⁻¹(p·t + ν1)/2 with ν = (2 − p·1ᵀQ⁻¹t)/(1ᵀQ⁻¹1) (Q from two valleys with rational ρ, ω)."""
    p, nu = sp.symbols("p nu")
    ws = sp.symbols(f"w1:{n + 1}")
    w = sp.Matrix(ws)
    valleys = ((sp.Rational(1, 2), 1), (sp.Rational(-1, 3), sp.Rational(3, 2)))  # (ρ_i, ω_i)
    Q = sp.zeros(n, n)
    for r, om in valleys:
        Q += om * sp.Matrix(n, n, lambda i, l, r=r: r ** abs(i - l))
    t, ones = sp.Matrix(range(1, n + 1)), sp.ones(n, 1)
    objective = p * (n - (t.T * w)[0]) + (w.T * Q * w)[0]
    lagrangian = objective - nu * (sum(ws) - 1)
    solution = sp.solve([sp.diff(lagrangian, x) for x in ws] + [sum(ws) - 1], [*ws, nu], dict=True)[0]
    q_t, q_1 = Q.LUsolve(t), Q.LUsolve(ones)
    nu_formula = (2 - p * sum(q_t)) / sum(q_1)
    formula = (p * q_t + nu_formula * q_1) / 2
    for i, x in enumerate(ws):
        _require_equal(solution[x], formula[i], f"optimal weight {i + 1}")
    _require_equal(solution[nu], nu_formula, "Lagrange multiplier")
    return True


def check_curved_river(K_max: int = 3, d_max: int = 2) -> bool:
    """Curved river (THEORY.md §d): with E e^(j) = e0 r^j at checkpoint j, the SMA mean is m_k = e0 r^k A_K,
    the Extra-Merge mean is m_k(1 − αδ) with δ = r^{−d} − 1, α* = (μm²δ − 2Ŵ)/(μm²δ² + 4Ŵ) minimises the
    loss, and the noise-free α* = 1/δ puts E_k exactly on u* (invariant 6)."""
    r, e0, mu, w_hat, const = sp.symbols("r e0 mu W_hat const", positive=True)
    for K in range(1, K_max + 1):
        for d in range(1, d_max + 1):
            k = K - 1 + d + 1
            mean = lambda end, K=K: sum(e0 * r ** (end - i) for i in range(K)) / K
            A_K = sum(r ** (-i) for i in range(K)) / K
            m_k = e0 * r**k * A_K
            _require_equal(mean(k), m_k, f"m_k, K={K} d={d}")
            delta = r ** (-d) - 1
            extra_mean = (1 + alpha) * mean(k) - alpha * mean(k - d)
            _require_equal(extra_mean, m_k * (1 - alpha * delta), f"E_k mean, K={K} d={d}")
            _require_equal(
                extra_mean.subs(alpha, 1 / delta), 0, f"noise-free α = 1/δ lands on u*, K={K} d={d}"
            )
    m, dl = sp.symbols("m delta", positive=True)
    loss = mu / 2 * m**2 * (1 - alpha * dl) ** 2 + const + 2 * w_hat * alpha * (1 + alpha)
    (a_star,) = sp.solve(sp.diff(loss, alpha), alpha)
    _require_equal(a_star, (mu * m**2 * dl - 2 * w_hat) / (mu * m**2 * dl**2 + 4 * w_hat), "curved α*")
    _require_equal(a_star.subs(w_hat, 0), 1 / dl, "noise-free curved α* = 1/δ")
    return True


# ---------------------------------------------------------------------------------------------------------
# §f


def check_decay_average() -> bool:
    """§f: linear decay from stationarity leaves G_dec(x) = ½√(π/x) erf(√x); a dense uniform average gives
    G_avg(x) = 2(x − 1 + e^{−x})/x²; they agree to first order in x; both advance the river by ηc(T+1)/2.

    G_dec solves dV/dt = −2λη_t V + η_t²σ² with η_t = η(1 − t/T): V(T)/V_0 = e^{−x} + 2x∫_0^1 τ² e^{−xτ²} dτ.
    """
    x = sp.Symbol("x", positive=True)
    tau, t1, t2 = sp.symbols("tau t1 t2", positive=True)
    g_dec = sp.sqrt(sp.pi / x) * sp.erf(sp.sqrt(x)) / 2
    derived_dec = sp.exp(-x) + 2 * x * sp.integrate(tau**2 * sp.exp(-x * tau**2), (tau, 0, 1))
    _require_equal(derived_dec, g_dec, "G_dec from the variance ODE")
    g_avg = 2 * (x - 1 + sp.exp(-x)) / x**2
    derived_avg = 2 * sp.integrate(sp.integrate(sp.exp(-x * (t1 - t2)), (t2, 0, t1)), (t1, 0, 1))
    _require_equal(derived_avg, g_avg, "G_avg from the autocorrelation double integral")
    first_order = sp.series(g_dec - g_avg, x, 0, 2).removeO()
    if sp.simplify(first_order) != 0:
        raise AssertionError(f"G_dec and G_avg should agree to first order in x, differ by {first_order}")
    T = sp.Symbol("T", integer=True, positive=True)
    step = sp.Symbol("t", integer=True, nonnegative=True)
    eta, c = sp.symbols("eta c", positive=True)
    advance = sp.summation(eta * c * (1 - step / T), (step, 0, T - 1))
    _require_equal(advance, eta * c * (T + 1) / 2, "river advance of a linear decay")
    return True


# ---------------------------------------------------------------------------------------------------------

_CHECKS = (
    ("§b  G_K closed form vs brute-force sum", check_sma_gain),
    ("§b  G_K derived for symbolic K", check_sma_gain_general_k),
    ("§b  C_d (both branches) vs brute-force sum", check_sma_cross),
    ("§b  S_d expansion near rho = 1 (theory.py)", check_window_sum_series),
    ("§b  EMA gain", check_ema_gain),
    ("§c  SMA / EMA lag", check_lags),
    ("§d  ΔL(α) quadratic, α*, α_match", derive_delta_loss_quadratic),
    ("§d' Extra-Merge weight vector reproduces §d", check_extra_weights_identity),
    ("§d' optimal affine merge (Lagrange)", check_optimal_weights),
    ("§d  curved river, noise-free α* = 1/δ", check_curved_river),
    ("§f  decay versus averaging", check_decay_average),
)


def run_all() -> dict[str, float]:
    """Run every check; returns {description: seconds}. Raises AssertionError on the first failure."""
    timings = {}
    for description, check in _CHECKS:
        start = time.perf_counter()
        check()
        timings[description] = time.perf_counter() - start
    return timings


def main() -> int:
    failures = 0
    for description, check in _CHECKS:
        start = time.perf_counter()
        try:
            check()
            status = "ok"
        except AssertionError as exc:
            failures += 1
            status = f"FAILED: {exc}"
        print(f"{description:<50s} {status}  ({time.perf_counter() - start:.2f} s)")
    print(f"{len(_CHECKS) - failures}/{len(_CHECKS)} identities verified")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
