"""The zoo's data: small, fixed, generated with NumPy from fixed seeds (or embedded when small).

Every function returns a dict of NumPy arrays (float64 or int64) so that the Pyro models
(``tests/models/zoo/*.py``) and their NumPyro twins (``benchmarks/zoo_references.py``) see
the same numbers. Where a source downloads a data set we cannot ship, we simulate data of the
same shape and say so in the entry's ``data_note``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "coin_flips",
    "rugged",
    "logistic_docstring",
    "kline",
    "robust",
    "ordinal",
    "horseshoe",
    "poll",
    "eight_schools",
    "baseball",
    "ucbadmit",
    "cafe",
    "osic",
    "lkj",
    "gp_tutorial",
    "gp_numpyro",
    "gp_classification",
    "gmm",
    "coal",
    "hmm",
    "ar2",
    "stochastic_volatility",
    "missing",
    "bnn",
    "lynx_hare",
]


def coin_flips() -> dict:
    """Pyro's SVI tutorial, part I: six heads, four tails."""
    return {"data": np.array([1.0] * 6 + [0.0] * 4)}


def rugged(num_nations: int = 170) -> dict:
    """Simulated stand-in for the terrain-ruggedness data of Pyro's regression tutorial
    (170 nations: is_cont_africa, ruggedness, log GDP); the download is not available offline."""
    rng = np.random.default_rng(0)
    africa = (rng.random(num_nations) < 0.3).astype(float)
    ruggedness = rng.gamma(1.5, 0.8, num_nations)
    log_gdp = 9.2 - 1.9 * africa - 0.2 * ruggedness + 0.4 * africa * ruggedness + rng.normal(0, 0.9, num_nations)
    return {"is_cont_africa": africa, "ruggedness": ruggedness, "log_gdp": log_gdp}


def logistic_docstring() -> dict:
    """Pyro's ``MCMC`` docstring: 2000 rows, three coefficients (1, 2, 3)."""
    rng = np.random.default_rng(1)
    data = rng.normal(size=(2000, 3))
    logits = data @ np.array([1.0, 2.0, 3.0])
    return {"data": data, "labels": (rng.random(2000) < 1 / (1 + np.exp(-logits))).astype(float)}


def kline() -> dict:
    """Oceanic tool counts (Kline & Boyd 2010), as in Statistical Rethinking's ``Kline``."""
    population = np.array([1100, 1500, 3600, 4791, 7400, 8000, 9200, 13000, 17500, 275000], dtype=float)
    contact = np.array([0, 0, 0, 1, 1, 1, 1, 0, 1, 0])  # 1 = high contact
    log_pop = np.log(population)
    return {
        "T": np.array([13, 22, 24, 43, 33, 19, 40, 28, 55, 71], dtype=float),
        "cid": contact,
        "P_std": (log_pop - log_pop.mean()) / log_pop.std(ddof=1),
        "P": population,
    }


def robust(num_points: int = 40) -> dict:
    """Simulated data for the Stan User's Guide robust (Student-t) regression, with outliers."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=num_points)
    y = 1.0 + 2.0 * x + 0.5 * rng.standard_t(3, size=num_points)
    return {"x": x, "y": y, "nu": 3.0}


def ordinal(num_points: int = 100) -> dict:
    """Simulated data for the Stan User's Guide ordered-logistic regression (K = 4, D = 2)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(num_points, 2))
    eta = x @ np.array([1.0, -0.5]) + rng.logistic(size=num_points)
    y = np.searchsorted(np.array([-1.0, 0.0, 1.2]), eta)  # 0..3
    return {"x": x, "y": y, "K": 4}


def horseshoe(num_data: int = 50, num_dims: int = 8, sigma_obs: float = 0.05) -> dict:
    """NumPyro's horseshoe example ``get_data`` (``np.random.seed(0)``), 50 rows, 8 columns."""
    np.random.seed(0)
    X = np.random.randn(num_data, num_dims)
    Y = X[:, :3] @ np.array([2.0, -1.0, 0.50])
    Y = Y - Y.mean()
    Y = Y + sigma_obs * np.random.randn(num_data)
    return {"X": X, "Y": Y}


def poll() -> dict:
    """BDA3 section 3.4: a pre-election poll (Bush 727, Dukakis 583, other 137)."""
    return {"counts": np.array([727.0, 583.0, 137.0])}


def eight_schools() -> dict:
    return {
        "J": 8,
        "y": np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]),
        "sigma": np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]),
    }


def baseball() -> dict:
    """Efron & Morris (1975): hits in the first 45 at-bats of 18 players (1970)."""
    hits = [18, 17, 16, 15, 14, 14, 13, 12, 11, 11, 10, 10, 10, 10, 10, 9, 8, 7]
    return {"at_bats": np.full(18, 45.0), "hits": np.array(hits, dtype=float)}


def ucbadmit() -> dict:
    """UC Berkeley admissions, Fall 1973 (the table in NumPyro's ucbadmit example)."""
    return {
        "dept": np.repeat(np.arange(6), 2),
        "male": np.tile([1.0, 0.0], 6),
        "applications": np.array([825, 108, 560, 25, 325, 593, 417, 375, 191, 393, 373, 341], dtype=float),
        "admit": np.array([512, 89, 353, 17, 120, 202, 138, 131, 53, 94, 22, 24], dtype=float),
    }


def cafe(num_cafes: int = 20, num_visits: int = 10) -> dict:
    """Statistical Rethinking code 14.1-14.5: simulated cafe waiting times (seed 5)."""
    rng = np.random.default_rng(5)
    a, b, sigma_a, sigma_b, rho = 3.5, -1.0, 1.0, 0.5, -0.7
    cov = np.array([[sigma_a**2, rho * sigma_a * sigma_b], [rho * sigma_a * sigma_b, sigma_b**2]])
    effects = rng.multivariate_normal([a, b], cov, size=num_cafes)
    afternoon = np.tile([0.0, 1.0], num_visits * num_cafes // 2)
    cafe_id = np.repeat(np.arange(num_cafes), num_visits)
    mu = effects[cafe_id, 0] + effects[cafe_id, 1] * afternoon
    return {"cafe": cafe_id, "afternoon": afternoon, "wait": rng.normal(mu, 0.5)}


def osic(num_patients: int = 10, num_visits: int = 9) -> dict:
    """Simulated stand-in for NumPyro's hierarchical-regression tutorial (OSIC lung function,
    FVC by week per patient); the competition data is not redistributable."""
    rng = np.random.default_rng(6)
    intercepts = rng.normal(2700.0, 600.0, num_patients)
    slopes = rng.normal(-4.0, 3.0, num_patients)
    patient = np.repeat(np.arange(num_patients), num_visits)
    weeks = rng.integers(-5, 60, size=num_patients * num_visits).astype(float)
    fvc = intercepts[patient] + slopes[patient] * weeks + rng.normal(0, 120.0, patient.size)
    return {"patient_code": patient, "Weeks": weeks, "FVC_obs": fvc}


def lkj(num_obs: int = 100, num_variables: int = 3) -> dict:
    """Pyro's LKJ example: ``y = torch.randn(n, d)`` (here n = 100, d = 3 to stay small)."""
    return {"y": np.random.default_rng(7).normal(size=(num_obs, num_variables))}


def gp_tutorial(num_points: int = 20) -> dict:
    """Pyro's GP tutorial data: X ~ U(0, 5), y = 0.5 sin(3X) + N(0, 0.2)."""
    rng = np.random.default_rng(8)
    X = rng.uniform(0.0, 5.0, num_points)
    return {"X": X, "y": 0.5 * np.sin(3 * X) + rng.normal(0.0, 0.2, num_points)}


def gp_numpyro(num_data: int = 25, sigma_obs: float = 0.15) -> dict:
    """NumPyro's GP example ``get_data`` (``np.random.seed(0)``, N = 25)."""
    np.random.seed(0)
    X = np.linspace(-1, 1, num_data)
    Y = X + 0.2 * np.power(X, 3.0) + 0.5 * np.power(0.5 + X, 2.0) * np.sin(4.0 * X)
    Y = Y + sigma_obs * np.random.randn(num_data)
    Y = (Y - Y.mean()) / Y.std()
    return {"X": X, "Y": Y}


def gp_classification(num_points: int = 30) -> dict:
    """Simulated binary data for the Stan User's Guide latent-variable GP classifier."""
    rng = np.random.default_rng(9)
    x = np.sort(rng.uniform(-3.0, 3.0, num_points))
    return {"x": x, "z": (rng.random(num_points) < 1 / (1 + np.exp(-2.0 * np.sin(1.5 * x)))).astype(float)}


def gmm() -> dict:
    """Pyro's GMM tutorial: five points."""
    return {"data": np.array([0.0, 1.0, 10.0, 11.0, 12.0])}


def coal() -> dict:
    """British coal-mining disasters per year, 1851-1962 (Jarrett 1979)."""
    counts = [
        4,
        5,
        4,
        1,
        0,
        4,
        3,
        4,
        0,
        6,
        3,
        3,
        4,
        0,
        2,
        6,
        3,
        3,
        5,
        4,
        5,
        3,
        1,
        4,
        4,
        1,
        5,
        5,
        3,
        4,
        2,
        5,
        2,
        2,
        3,
        4,
        2,
        1,
        3,
        2,
        2,
        1,
        1,
        1,
        1,
        3,
        0,
        0,
        1,
        0,
        1,
        1,
        0,
        0,
        3,
        1,
        0,
        3,
        2,
        2,
        0,
        1,
        1,
        1,
        0,
        1,
        0,
        1,
        0,
        0,
        0,
        2,
        1,
        0,
        0,
        0,
        1,
        1,
        0,
        2,
        3,
        3,
        1,
        1,
        2,
        1,
        1,
        1,
        1,
        2,
        4,
        2,
        0,
        0,
        0,
        1,
        4,
        0,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        1,
        0,
        0,
        1,
        0,
        1,
    ]
    return {"D": np.array(counts, dtype=float), "r_e": 1.0, "r_l": 1.0}


def hmm(num_sequences: int = 3, length: int = 30, data_dim: int = 4) -> dict:
    """Simulated binary sequences from a 2-state HMM, standing in for JSB chorales in Pyro's
    HMM example (which downloads them)."""
    rng = np.random.default_rng(10)
    transition = np.array([[0.9, 0.1], [0.2, 0.8]])
    emission = np.array([[0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.7, 0.9]])[:, :data_dim]
    sequences = np.zeros((num_sequences, length, data_dim))
    for i in range(num_sequences):
        state = 0
        for t in range(length):
            state = rng.choice(2, p=transition[state])
            sequences[i, t] = rng.random(data_dim) < emission[state]
    return {"sequences": sequences, "lengths": np.array([length, length - 5, length - 10])[:num_sequences]}


def ar2(num_data: int = 142) -> dict:
    """NumPyro's AR2 example data, y = sin(t) + N(0, 0.1) (NumPy's generator instead of JAX's key)."""
    t = np.arange(num_data)
    return {"y": np.sin(t) + np.random.default_rng(11).normal(size=num_data) * 0.1}


def stochastic_volatility(num_days: int = 100) -> dict:
    """Simulated daily returns standing in for NumPyro's S&P 500 download: a log-volatility
    random walk and Student-t returns."""
    rng = np.random.default_rng(12)
    s = np.cumsum(rng.normal(0.0, 0.05, num_days)) - 4.0
    return {"returns": np.exp(s) * rng.standard_t(5.0, num_days)}


def missing(num_points: int = 12) -> dict:
    """Simulated normal data with three values missing (Stan User's Guide, missing data)."""
    y = np.random.default_rng(13).normal(1.0, 2.0, num_points)
    mask = np.ones(num_points, dtype=bool)
    mask[[2, 7, 9]] = False
    return {"y": np.where(mask, y, 0.0), "mask": mask}


def bnn(num_data: int = 50, num_dims: int = 3, sigma_obs: float = 0.05) -> dict:
    """NumPyro's BNN example ``get_data`` (``np.random.seed(0)``, N = 50)."""
    np.random.seed(0)
    X = np.linspace(-1, 1, num_data)
    X = np.power(X[:, np.newaxis], np.arange(num_dims))
    W = 0.5 * np.random.randn(num_dims)
    Y = X @ W + 0.5 * np.power(0.5 + X[:, 1], 2.0) * np.sin(4.0 * X[:, 1])
    Y = Y + sigma_obs * np.random.randn(num_data)
    Y = Y[:, np.newaxis]
    Y = (Y - Y.mean()) / Y.std()
    return {"X": X, "Y": Y}


def lynx_hare() -> dict:
    """Hudson's Bay Company pelts (thousands), 1900-1920, hare then lynx: NumPyro's ``LYNXHARE``
    data set and Carpenter's Stan case study (embedded: the source downloads it)."""
    hare = [30.0, 47.2, 70.2, 77.4, 36.3, 20.6, 18.1, 21.4, 22.0, 25.4, 27.1]
    hare += [40.3, 57.0, 76.6, 52.3, 19.5, 11.2, 7.6, 14.6, 16.2, 24.7]
    lynx = [4.0, 6.1, 9.8, 35.2, 59.4, 41.7, 19.0, 13.0, 8.3, 9.1, 7.4]
    lynx += [8.0, 12.3, 19.5, 45.7, 51.1, 29.7, 15.8, 9.7, 10.1, 8.6]
    return {"year": np.arange(1900, 1921), "y": np.stack([hare, lynx], -1)}
