"""Butcher tableaus and interpolants, as plain data, for flashode's Runge-Kutta solvers.

One generic adaptive solver runs every tableau in ``ADAPTIVE``, one fixed-grid solver every
tableau in ``FIXED`` and one implicit solver every tableau in ``IMPLICIT``; ``INTERPOLANTS`` holds
the accurate continuous extensions of the adaptive methods (dense output, events). A method is
nothing but its coefficients here.

The adaptive tableaus reproduce torchdiffeq 0.2.5's methods *including their stage structure*,
so that flashode, a drop-in replacement for torchdiffeq, takes, accepts and rejects the same
steps and interpolates the same way:

* Stage 0 is not evaluated inside a step: it is the previous step's last stage, which
  torchdiffeq carries over as ``f0`` (only the very first ``f0`` is ``f(t0, y0)``).
* ``y1 = y0 + h * sum_j b[j] k[j]`` and ``err = h * sum_j b_error[j] k[j]``.
* Dense output is torchdiffeq's quartic through ``y0``, ``y1``, a mid-point value and the end
  derivatives, rewritten as per-stage weight polynomials (see ``_quartic_fit_dense``).

Coefficients are written as exact rationals (``Fraction``) wherever the literature gives them
so, and rounded to float64 once, when the tableau is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction as F

__all__ = ["ADAPTIVE", "FIXED", "IMPLICIT", "INTERPOLANTS", "ImplicitTableau", "Interpolant", "Tableau"]


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method with S stages.

    Stages: ``k[0] = f(t0, y0)`` (adaptive solvers: the previous step's last stage, see
    ``fsal``) and, for i >= 1, ``k[i] = f(t0 + c[i] h, y0 + h * sum_{j<i} a[i][j] k[j])``.
    Solution: ``y1 = y0 + h * sum_j b[j] k[j]``.
    Error estimate (adaptive methods): ``err = h * sum_j b_error[j] k[j]``.
    Dense output: ``y(t0 + theta h) = y0 + h * sum_j B_j(theta) k[j]`` with
    ``B_j(theta) = sum_p dense[j][p] * theta**(p + 1)``.
    """

    name: str
    # Adaptive methods: the order torchdiffeq's step-size controller uses (factor
    # error_ratio**(-1/order); the initial-step heuristic uses order - 1). Fixed-grid methods:
    # the convergence order.
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_error: tuple[float, ...] | None
    dense: tuple[tuple[float, ...], ...]
    # Whether the last stage is f(t0 + h, y1) (first same as last). Adaptive solvers carry the
    # last stage over as the next step's k[0] even when it is not (fehlberg2, adaptive_heun),
    # because torchdiffeq does; fsal says whether that stage is the derivative at y1.
    fsal: bool

    def __post_init__(self) -> None:
        s = len(self.c)
        if s == 0 or self.c[0] != 0.0:
            raise ValueError(f"{self.name}: c must be non-empty and start with 0")
        if len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(f"{self.name}: a must be strictly lower triangular, a[i] of length i")
        if len(self.b) != s or (self.b_error is not None and len(self.b_error) != s):
            raise ValueError(f"{self.name}: b and b_error must have one weight per stage")
        if self.dense and (len(self.dense) != s or len({len(row) for row in self.dense}) != 1):
            raise ValueError(f"{self.name}: dense must have one row per stage, all of one degree")


# A coefficient: exact where the literature gives a rational, else the published decimal.
_Coef = F | float


def _floats(xs: Sequence[_Coef]) -> tuple[float, ...]:
    return tuple(float(x) for x in xs)


def _solve_weight_polys(conditions: list[tuple[list[F], list[F]]]) -> tuple[tuple[float, ...], ...]:
    """Per-row weight polynomials of the q of degree D = len(conditions) meeting every condition
    (its functional on theta**1 .. theta**D, its data over the rows), by Gauss-Jordan over the
    rationals, for all rows at once."""
    degree = len(conditions)
    rows = [list(functional) + list(data) for functional, data in conditions]
    for col in range(degree):
        pivot = next((r for r in range(col, degree) if rows[r][col] != 0), None)
        if pivot is None:
            raise ValueError("these interpolation conditions do not determine the polynomial")
        rows[col], rows[pivot] = rows[pivot], rows[col]
        rows[col] = [x / rows[col][col] for x in rows[col]]
        for r in range(degree):
            if r != col and rows[r][col] != 0:
                factor = rows[r][col]
                rows[r] = [x - factor * y for x, y in zip(rows[r], rows[col])]
    n_rows = len(rows[0]) - degree
    return tuple(tuple(float(rows[p][degree + j]) for p in range(degree)) for j in range(n_rows))


def _quartic_fit_dense(b: Sequence[F], c_mid: Sequence[F]) -> tuple[tuple[float, ...], ...]:
    """Per-stage weight polynomials of torchdiffeq's interpolant for one step.

    torchdiffeq fits the quartic p(theta) with p(0) = y0, p(1) = y1, p(1/2) = y_mid,
    p'(0) = h k[0] and p'(1) = h k[S-1], where y1 = y0 + h sum_j b[j] k[j] and
    y_mid = y0 + h sum_j c_mid[j] k[j]. Writing p = y0 + h q, the quartic q has no constant
    term and every condition on it is linear in the stages, so q = sum_j B_j k[j] where B_j is
    the quartic meeting the conditions with the data replaced by stage j's weights:
    B_j'(0) = [j == 0], B_j(1) = b[j], B_j(1/2) = c_mid[j], B_j'(1) = [j == S-1].
    The 4x4 system for B_j's coefficients of theta..theta**4 is solved exactly, for all
    stages at once.
    """
    s = len(b)
    # Each condition: its functional on theta**1..theta**4, then its data per stage.
    return _solve_weight_polys([
        ([F(1), F(0), F(0), F(0)], [F(int(j == 0)) for j in range(s)]),
        ([F(1), F(1), F(1), F(1)], list(b)),
        ([F(1, 2), F(1, 4), F(1, 8), F(1, 16)], list(c_mid)),
        ([F(1), F(2), F(3), F(4)], [F(int(j == s - 1)) for j in range(s)]),
    ])


def _tableau(
    name: str,
    order: int,
    c: Sequence[_Coef],
    a: Sequence[Sequence[_Coef]],
    b: Sequence[_Coef],
    b_error: Sequence[_Coef] | None = None,
    dense: tuple[tuple[float, ...], ...] = (),
) -> Tableau:
    fsal = tuple(a[-1]) == tuple(b[:-1]) and b[-1] == 0 and c[-1] == 1
    return Tableau(
        name=name,
        order=order,
        c=_floats(c),
        a=tuple(_floats(row) for row in a),
        b=_floats(b),
        b_error=None if b_error is None else _floats(b_error),
        dense=dense,
        fsal=fsal,
    )


def _torchdiffeq_tableau(
    name: str,
    order: int,
    c: Sequence[F],
    a: Sequence[Sequence[F]],
    b: Sequence[F],
    b_hat: Sequence[F],
    c_mid: Sequence[F],
) -> Tableau:
    """A torchdiffeq adaptive method from its solution weights b, embedded weights b_hat and
    mid-point weights c_mid (torchdiffeq stores b - b_hat as its ``c_error``)."""
    b_error = [x - y for x, y in zip(b, b_hat)]
    return _tableau(name, order, c, a, b, b_error, _quartic_fit_dense(b, c_mid))


# ---------------------------------------------------------------------------------------------
# Adaptive methods
# ---------------------------------------------------------------------------------------------

# Dormand-Prince 5(4), FSAL, 7 stages. The embedded weights are the ones torchdiffeq uses (they
# differ from the 5179/57600, ... pair usually quoted; both are 4th order); c_mid from Shampine's
# continuous extension evaluated at theta = 1/2, as in torchdiffeq.
_DOPRI5_B = (F(35, 384), F(0), F(500, 1113), F(125, 192), F(-2187, 6784), F(11, 84), F(0))
_DOPRI5 = _torchdiffeq_tableau(
    "dopri5",
    5,
    c=(F(0), F(1, 5), F(3, 10), F(4, 5), F(8, 9), F(1), F(1)),
    a=(
        (),
        (F(1, 5),),
        (F(3, 40), F(9, 40)),
        (F(44, 45), F(-56, 15), F(32, 9)),
        (F(19372, 6561), F(-25360, 2187), F(64448, 6561), F(-212, 729)),
        (F(9017, 3168), F(-355, 33), F(46732, 5247), F(49, 176), F(-5103, 18656)),
        _DOPRI5_B[:6],
    ),
    b=_DOPRI5_B,
    b_hat=(
        F(1951, 21600), F(0), F(22642, 50085), F(451, 720), F(-12231, 42400), F(649, 6300),
        F(1, 60),
    ),
    c_mid=(
        F(6025192743, 30085553152) / 2,
        F(0),
        F(51252292925, 65400821598) / 2,
        F(-2691868925, 45128329728) / 2,
        F(187940372067, 1594534317056) / 2,
        F(-1776094331, 19743644256) / 2,
        F(11237099, 235043384) / 2,
    ),
)

# Bogacki-Shampine 3(2), FSAL, 4 stages. torchdiffeq's mid-point value y0 + h/2 k[1] is only
# first-order accurate (k[1] is the slope at t0 + h/2, not the mean slope over [t0, t0 + h/2]),
# and so is its quartic interpolant; fehlberg2 and adaptive_heun below have the same flaw. Kept
# as is, for agreement with torchdiffeq.
_BOSH3 = _torchdiffeq_tableau(
    "bosh3",
    3,
    c=(F(0), F(1, 2), F(3, 4), F(1)),
    a=((), (F(1, 2),), (F(0), F(3, 4)), (F(2, 9), F(1, 3), F(4, 9))),
    b=(F(2, 9), F(1, 3), F(4, 9), F(0)),
    b_hat=(F(7, 24), F(1, 4), F(1, 3), F(1, 8)),
    c_mid=(F(0), F(1, 2), F(0), F(0)),
)

# Fehlberg 2(1) and adaptive Heun 2(1) are NOT first-same-as-last: their last stage is evaluated
# at the lower-order (embedded) solution, not at y1. torchdiffeq nevertheless carries that last
# stage to the next step as its k[0] (instead of f(t1, y1)), and so does flashode, on purpose:
# the stage structure is kept identical so that both libraries produce the same steps.
_FEHLBERG2 = _torchdiffeq_tableau(
    "fehlberg2",
    2,
    c=(F(0), F(1, 2), F(1)),
    a=((), (F(1, 2),), (F(1, 256), F(255, 256))),
    b=(F(1, 512), F(255, 256), F(1, 512)),
    b_hat=(F(1, 256), F(255, 256), F(0)),
    c_mid=(F(0), F(1, 2), F(0)),
)

_ADAPTIVE_HEUN = _torchdiffeq_tableau(
    "adaptive_heun",
    2,
    c=(F(0), F(1)),
    a=((), (F(1),)),
    b=(F(1, 2), F(1, 2)),
    b_hat=(F(0), F(1)),
    c_mid=(F(1, 2), F(0)),
)

# Prince-Dormand RK8(7)13M with a 14th stage f(t1, y1) appended (as torchdiffeq does), which
# makes it FSAL. Most coefficients are the authors' rational approximations of irrational
# values, so the row-sum condition sum(a[i]) == c[i] holds exactly for the first rows only, and
# to about 1e-17 for the others.
_DOPRI8_B = (
    F(14005451, 335480064), F(0), F(0), F(0), F(0), F(-59238493, 1068277825),
    F(181606767, 758867731), F(561292985, 797845732), F(-1041891430, 1371343529),
    F(760417239, 1151165299), F(118820643, 751138087), F(-528747749, 2220607170), F(1, 4), F(0),
)


# torchdiffeq's degree-6 continuous extension for dopri8, b_j(theta) = sum_p coef[p] * theta**(p + 1)
# (other stages have weight 0). Measured, it is of order 5 only (its error is O(h**6)).
_DOPRI8_EXTENSION: dict[int, tuple[str, ...]] = {  # stage: published coefficients of theta**1 .. theta**6
    0: ("1.0", "-6.6910181737837595697", "19.9990069333683970610", "-30.0610568289666450593",
        "22.1396504998094068976", "-6.3448349392860401388"),
    5: ("0", "-7.6142658045872677172", "52.2273532792945524050", "-121.4999627731334642623",
        "116.4422149550342161651", "-39.6107919852202505218"),
    6: ("0", "10.7281392630428866124", "-46.8919164181093621583", "83.1721004639847717481",
        "-67.1451318825957197185", "20.3761213808791436958"),
    7: ("0", "0.5526637063753648783", "-0.1890893225010595467", "9.5724507555993664382",
        "-16.5672243527496524646", "7.3347098826795362023"),
    8: ("0", "4.2186562625665153803", "-35.7075975946222072821", "87.8406057677205645007",
        "-89.9916014847245016028", "32.8801774352459155182"),
    9: ("0", "-0.6627209125361597559", "6.2736448083240352160", "-17.4152107770762969005",
        "22.6237489648532849093", "-10.1588990526426760954"),
    10: ("0", "-1.2636789001135462218", "10.3160881272450748458", "-28.5903289514790976966",
         "32.2362340167355370113", "-12.5401268098782561200"),
    11: ("0", "5.4106037898590422230", "-34.7650769866611817349", "81.6630950584341412934",
         "-82.1020315488359848644", "29.5553001484516038033"),
    12: ("0", "-7.0321379067945741781", "47.7457971078225540396", "-114.9375291377009418170",
         "116.2662185791119533462", "-41.7923486424390588923"),
    13: ("0", "2.3537586759714983486", "-19.0082099341608028453", "50.2558364226176017553",
         "-53.9020777466385396792", "20.3006925822100825485"),
}


def _dopri8_c_mid() -> list[F]:
    """torchdiffeq's mid-point weights for dopri8: its continuous extension at theta = 1/2."""
    half = F(1, 2)
    return [
        sum((F(x) * half ** (p + 1) for p, x in enumerate(_DOPRI8_EXTENSION[j])), F(0))
        if j in _DOPRI8_EXTENSION
        else F(0)
        for j in range(14)
    ]


_DOPRI8 = _torchdiffeq_tableau(
    "dopri8",
    8,
    c=(
        F(0), F(1, 18), F(1, 12), F(1, 8), F(5, 16), F(3, 8), F(59, 400), F(93, 200),
        F(5490023248, 9719169821), F(13, 20), F(1201146811, 1299019798), F(1), F(1), F(1),
    ),
    a=(
        (),
        (F(1, 18),),
        (F(1, 48), F(1, 16)),
        (F(1, 32), F(0), F(3, 32)),
        (F(5, 16), F(0), F(-75, 64), F(75, 64)),
        (F(3, 80), F(0), F(0), F(3, 16), F(3, 20)),
        (F(29443841, 614563906), F(0), F(0), F(77736538, 692538347), F(-28693883, 1125000000),
         F(23124283, 1800000000)),
        (F(16016141, 946692911), F(0), F(0), F(61564180, 158732637), F(22789713, 633445777),
         F(545815736, 2771057229), F(-180193667, 1043307555)),
        (F(39632708, 573591083), F(0), F(0), F(-433636366, 683701615),
         F(-421739975, 2616292301), F(100302831, 723423059), F(790204164, 839813087),
         F(800635310, 3783071287)),
        (F(246121993, 1340847787), F(0), F(0), F(-37695042795, 15268766246),
         F(-309121744, 1061227803), F(-12992083, 490766935), F(6005943493, 2108947869),
         F(393006217, 1396673457), F(123872331, 1001029789)),
        (F(-1028468189, 846180014), F(0), F(0), F(8478235783, 508512852),
         F(1311729495, 1432422823), F(-10304129995, 1701304382), F(-48777925059, 3047939560),
         F(15336726248, 1032824649), F(-45442868181, 3398467696), F(3065993473, 597172653)),
        (F(185892177, 718116043), F(0), F(0), F(-3185094517, 667107341),
         F(-477755414, 1098053517), F(-703635378, 230739211), F(5731566787, 1027545527),
         F(5232866602, 850066563), F(-4093664535, 808688257), F(3962137247, 1805957418),
         F(65686358, 487910083)),
        (F(403863854, 491063109), F(0), F(0), F(-5068492393, 434740067),
         F(-411421997, 543043805), F(652783627, 914296604), F(11173962825, 925320556),
         F(-13158990841, 6184727034), F(3936647629, 1978049680), F(-160528059, 685178525),
         F(248638103, 1413531060), F(0)),
        _DOPRI8_B[:13],
    ),
    b=_DOPRI8_B,
    b_hat=(
        F(13451932, 455176623), F(0), F(0), F(0), F(0), F(-808719846, 976000145),
        F(1757004468, 5645159321), F(656045339, 265891186), F(-3867574721, 1518517206),
        F(465885868, 322736535), F(53011238, 667516719), F(2, 45), F(0), F(0),
    ),
    c_mid=_dopri8_c_mid(),
)

# Tsitouras 5(4) (Ch. Tsitouras, "Runge-Kutta pairs of order 5(4) satisfying only the first
# column simplifying assumption", Comput. Math. Appl. 62 (2011) 770-775): FSAL, 7 stages, with
# the paper's own 4th-degree continuous extension as dense output. The coefficients are only
# published as decimals; these are the float64 values used by OrdinaryDiffEq.jl's Tsit5 (its
# rows of a sum to c to about 1e-15).
_TSIT5_B = (
    0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
    2.324710524099774, 0.0,
)
_TSIT5 = _tableau(
    "tsit5",
    5,
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    a=(
        (),
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.897153057105493, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
         -0.028269050394068383),
        _TSIT5_B[:6],
    ),
    b=_TSIT5_B,
    # b - b_hat, b_hat being the paper's 4th-order embedded weights (OrdinaryDiffEq.jl stores
    # the opposite sign, b_hat - b; the sign does not matter to the error norm).
    b_error=(
        0.00178001105222577714, 0.0008164344596567469, -0.007880878010261995,
        0.1447110071732629, -0.5823571654525552, 0.45808210592918697, -1 / 66,
    ),
    # B_j(theta) = sum_p dense[j][p] theta**(p+1): the paper's b_j(theta), expanded.
    dense=(
        (1.0, -2.763706197274826, 2.9132554618219126, -1.0530884977290216),
        (0.0, 0.1317, -0.2234, 0.1017),
        (0.0, 3.9302962368947516, -5.941033872131505, 2.490627285651253),
        (0.0, -12.411077166933676, 30.33818863028232, -16.548102889244902),
        (0.0, 37.50931341651104, -88.1789048947664, 47.37952196281928),
        (0.0, -27.896526289197286, 65.09189467479366, -34.87065786149661),
        (0.0, 1.5, -4.0, 2.5),
    ),
)

ADAPTIVE: dict[str, Tableau] = {
    t.name: t for t in (_DOPRI5, _DOPRI8, _BOSH3, _FEHLBERG2, _ADAPTIVE_HEUN, _TSIT5)
}

# ---------------------------------------------------------------------------------------------
# odeint_dense's interpolants. The quartic fits above stay odeint's (its outputs match
# torchdiffeq's), but between step ends they can be far less accurate than the steps: ~1000x
# the tolerance for bosh3 and dopri8, whose mid-point values are of low order. These are as
# accurate between the step ends as at them.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interpolant:
    """A continuous extension y(t0 + theta h) = y0 + h q(theta) for one adaptive method.

    Rows: the step's S stages k, then one slope g[i] per node. q is the polynomial of degree
    len(nodes) + 3 with q'(0) = k[0], q(1) = sum_j b[j] k[j] (the step's y1), q'(1) = k[S-1] and
    q'(nodes[i]) = g[i]; ``dense`` holds its weight polynomials over the rows, as
    ``Tableau.dense`` does over the stages. For fehlberg2 and adaptive_heun (not FSAL), k[S-1] is
    the slope at a lower-order solution, y1 minus the error estimate, and k[0] the previous step's;
    harmless, as q scales a slope error by h.

    The slopes come from bootstrapping (Enright, Jackson, Norsett, Thomsen, ACM TOMS 12 (1986)
    193-218): each of ``rounds`` rounds sets g[i] = f(t0 + nodes[i] h, u(nodes[i])) on the
    previous round's interpolant u, ``start`` (weights over the stages) for the first round.
    A slope error enters q times h, so a round raises the order by one, up to the degree.
    Cost: rounds * len(nodes) evaluations of f per step.
    """

    start: tuple[tuple[float, ...], ...]
    nodes: tuple[float, ...]
    rounds: int
    dense: tuple[tuple[float, ...], ...]


def _interpolant(
    tableau: Tableau,
    nodes: Sequence[F] = (),
    rounds: int = 0,
    start: tuple[tuple[float, ...], ...] = (),
) -> Interpolant:
    # b as the exact values of the floats the solver steps with, so that q(1) is its y1.
    b = [F(x) for x in tableau.b]
    s, m = len(b), len(nodes)
    degree, n_rows = m + 3, s + m

    def value(x: F) -> list[F]:
        return [x ** (p + 1) for p in range(degree)]

    def slope(x: F) -> list[F]:
        return [(p + 1) * x**p for p in range(degree)]

    def unit(row: int) -> list[F]:
        return [F(int(j == row)) for j in range(n_rows)]

    conditions = [(slope(F(0)), unit(0)), (value(F(1)), b + [F(0)] * m), (slope(F(1)), unit(s - 1))]
    conditions += [(slope(x), unit(s + i)) for i, x in enumerate(nodes)]
    return Interpolant(start, _floats(nodes), rounds, _solve_weight_polys(conditions))


# Nodes in symmetric pairs (an odd number of symmetric nodes leaves q(1) undetermined), placed
# so that over [0, 1] y1's weight stays within [0, 1] and the slopes' weights sum to at most 0.6.
_PAIR = (F(7, 20), F(13, 20))
INTERPOLANTS: dict[str, Interpolant] = {
    # 4th-order free interpolants, bootstrapped once to 5th order: 2 evaluations of f per step.
    "dopri5": _interpolant(_DOPRI5, _PAIR, 1, _DOPRI5.dense),
    "tsit5": _interpolant(_TSIT5, _PAIR, 1, _TSIT5.dense),
    # From torchdiffeq's 5th-order extension, twice, to 7th order: 8 evaluations of f per step.
    "dopri8": _interpolant(
        _DOPRI8,
        (F(1, 6), F(1, 3), F(2, 3), F(5, 6)),
        2,
        tuple(tuple(float(x) for x in _DOPRI8_EXTENSION.get(j, ("0",) * 6)) for j in range(len(_DOPRI8.c))),
    ),
    # Cubic Hermite through y0, k[0], y1, k[S-1]: 3rd order, at least the method's, and free.
    **{name: _interpolant(ADAPTIVE[name]) for name in ("bosh3", "fehlberg2", "adaptive_heun")},
}

# ---------------------------------------------------------------------------------------------
# Fixed-grid methods (torchdiffeq's euler, midpoint, heun2, heun3, rk4). Every step evaluates
# k[0] = f(t0, y0) afresh, and dense output is the fixed-grid solver's own linear or cubic
# Hermite interpolation, so these carry neither error weights nor stage-based dense output.
# ---------------------------------------------------------------------------------------------

FIXED: dict[str, Tableau] = {
    t.name: t
    for t in (
        _tableau("euler", 1, c=(F(0),), a=((),), b=(F(1),)),
        # y_mid = y0 + h/2 k[0]; y1 = y0 + h f(t0 + h/2, y_mid).
        _tableau("midpoint", 2, c=(F(0), F(1, 2)), a=((), (F(1, 2),)), b=(F(0), F(1))),
        _tableau("heun2", 2, c=(F(0), F(1)), a=((), (F(1),)), b=(F(1, 2), F(1, 2))),
        _tableau(
            "heun3",
            3,
            c=(F(0), F(1, 3), F(2, 3)),
            a=((), (F(1, 3),), (F(0), F(2, 3))),
            b=(F(1, 4), F(0), F(3, 4)),
        ),
        # torchdiffeq's "rk4" is Kutta's 3/8 rule (its rk4_alt_step_func), not the classic RK4.
        _tableau(
            "rk4",
            4,
            c=(F(0), F(1, 3), F(2, 3), F(1)),
            a=((), (F(1, 3),), (F(-1, 3), F(1)), (F(1), F(-1), F(1))),
            b=(F(1, 8), F(3, 8), F(3, 8), F(1, 8)),
        ),
    )
}

# ---------------------------------------------------------------------------------------------
# Implicit fixed-grid methods (torchdiffeq master's implicit_euler ... trbdf2), run by
# solvers/implicit_rk.py. The stage derivatives solve k[i] = f(t0 + c[i] h, y0 + h * sum_j
# a[i][j] k[j]) over the full matrix a; y1 = y0 + h * sum_j b[j] k[j]. Leading stages with c == 0
# and a zero row are explicit: k = f(t0, y0).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImplicitTableau:
    """An implicit Runge-Kutta method with S stages and a full S x S matrix ``a``.

    ``diagonally_implicit``: ``a`` is lower triangular and the stages are solved one at a time
    (torchdiffeq's FixedGridDIRKODESolver); otherwise every implicit stage is solved at once
    (FixedGridFIRKODESolver).
    """

    name: str
    order: int  # the convergence order
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    diagonally_implicit: bool

    def __post_init__(self) -> None:
        s = len(self.c)
        if s == 0 or len(self.b) != s or len(self.a) != s or any(len(row) != s for row in self.a):
            raise ValueError(f"{self.name}: c, b and every row of a must have one entry per stage")
        if self.diagonally_implicit and any(self.a[i][j] for i in range(s) for j in range(i + 1, s)):
            raise ValueError(f"{self.name}: a diagonally implicit method needs a lower triangular a")


def _implicit(
    name: str,
    order: int,
    c: Sequence[_Coef],
    a: Sequence[Sequence[_Coef]],
    b: Sequence[_Coef],
    diagonally_implicit: bool = False,
) -> ImplicitTableau:
    return ImplicitTableau(name, order, _floats(c), tuple(_floats(row) for row in a), _floats(b), diagonally_implicit)


_SQRT2, _SQRT3, _SQRT6, _SQRT15 = (x**0.5 for x in (2, 3, 6, 15))
# SDIRK2's and TR-BDF2's diagonal entry, 1 - sqrt(2)/2: the value that makes them L-stable.
_GAMMA = 1 - _SQRT2 / 2

IMPLICIT: dict[str, ImplicitTableau] = {
    t.name: t
    for t in (
        _implicit("implicit_euler", 1, c=(F(1),), a=((F(1),),), b=(F(1),)),
        _implicit("implicit_midpoint", 2, c=(F(1, 2),), a=((F(1, 2),),), b=(F(1),)),
        _implicit("trapezoid", 2, c=(F(0), F(1)), a=((F(0), F(0)), (F(1, 2), F(1, 2))), b=(F(1, 2), F(1, 2))),
        _implicit(
            "radauIIA3", 3, c=(F(1, 3), F(1)), a=((F(5, 12), F(-1, 12)), (F(3, 4), F(1, 4))), b=(F(3, 4), F(1, 4))
        ),
        # Gauss-Legendre, 2 stages. torchdiffeq master gives both stages c = 1/2 - sqrt(3)/6, which
        # evaluates a time-dependent f at the wrong time in the second stage; these are the nodes.
        _implicit(
            "gl4",
            4,
            c=(F(1, 2) - _SQRT3 / 6, F(1, 2) + _SQRT3 / 6),
            a=((F(1, 4), F(1, 4) - _SQRT3 / 6), (F(1, 4) + _SQRT3 / 6, F(1, 4))),
            b=(F(1, 2), F(1, 2)),
        ),
        _implicit(
            "radauIIA5",
            5,
            c=((4 - _SQRT6) / 10, (4 + _SQRT6) / 10, F(1)),
            a=(
                ((88 - 7 * _SQRT6) / 360, (296 - 169 * _SQRT6) / 1800, (-2 + 3 * _SQRT6) / 225),
                ((296 + 169 * _SQRT6) / 1800, (88 + 7 * _SQRT6) / 360, (-2 - 3 * _SQRT6) / 225),
                ((16 - _SQRT6) / 36, (16 + _SQRT6) / 36, F(1, 9)),
            ),
            b=((16 - _SQRT6) / 36, (16 + _SQRT6) / 36, F(1, 9)),
        ),
        _implicit(
            "gl6",
            6,
            c=(F(1, 2) - _SQRT15 / 10, F(1, 2), F(1, 2) + _SQRT15 / 10),
            a=(
                (F(5, 36), F(2, 9) - _SQRT15 / 15, F(5, 36) - _SQRT15 / 30),
                (F(5, 36) + _SQRT15 / 24, F(2, 9), F(5, 36) - _SQRT15 / 24),
                (F(5, 36) + _SQRT15 / 30, F(2, 9) + _SQRT15 / 15, F(5, 36)),
            ),
            b=(F(5, 18), F(4, 9), F(5, 18)),
        ),
        _implicit(
            "sdirk2", 2, c=(_GAMMA, F(1)), a=((_GAMMA, F(0)), (1 - _GAMMA, _GAMMA)), b=(1 - _GAMMA, _GAMMA),
            diagonally_implicit=True,
        ),
        # TR-BDF2: a trapezoidal stage to t0 + 2 gamma h, then BDF2 to t1 (an explicit first stage).
        _implicit(
            "trbdf2",
            2,
            c=(F(0), 2 * _GAMMA, F(1)),
            a=((F(0), F(0), F(0)), (_GAMMA, _GAMMA, F(0)), (_SQRT2 / 4, _SQRT2 / 4, _GAMMA)),
            b=(_SQRT2 / 4, _SQRT2 / 4, _GAMMA),
            diagonally_implicit=True,
        ),
    )
}
