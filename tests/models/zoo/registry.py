"""The zoo's entries (plain dicts, turned into ``ZooEntry`` records by the package)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from . import closed_form as cf
from . import data as d
from . import discrete, glm, gp, hierarchical, ode, timeseries
from .modes import HMM_FOLD

__all__ = ["ENTRIES", "tensor"]

PYRO = "https://github.com/pyro-ppl/pyro/blob/dev/"
NUMPYRO = "https://github.com/pyro-ppl/numpyro/blob/master/"
STAN_GUIDE = "https://mc-stan.org/docs/stan-users-guide/"
RETHINKING = "https://github.com/fehiepsi/rethinking-numpyro"


def tensor(value, dtype=None):
    return torch.as_tensor(np.asarray(value), dtype=dtype or torch.get_default_dtype())


def _long(value):
    return torch.as_tensor(np.asarray(value), dtype=torch.long)


def _gmm_statistics(draws):
    """Label-invariant: the scale, the lower and upper location and the lower one's weight."""
    locs, weights = np.asarray(draws["locs"]), np.asarray(draws["weights"])
    low = np.argmin(locs, axis=-1)
    rows = np.arange(len(locs))
    return {
        "scale": np.asarray(draws["scale"]),
        "locs_low": locs.min(-1),
        "locs_high": locs.max(-1),
        "weight_low": weights[rows, low],
    }


def _hmm_statistics(draws):
    """Label-invariant: states ordered by their probability of the first tone."""
    probs_x, probs_y = np.asarray(draws["probs_x"]), np.asarray(draws["probs_y"])
    order = np.argsort(-probs_y[:, :, 0], axis=-1)  # state 0 plays tone 0 most
    rows = np.arange(len(order))[:, None]
    probs_y = probs_y[rows, order]
    probs_x = np.stack([probs_x[i][np.ix_(order[i], order[i])] for i in range(len(order))])
    out = {f"stay[{k + 1}]": probs_x[:, k, k] for k in range(probs_x.shape[1])}
    out.update(
        {
            f"probs_y[{k + 1},{j + 1}]": probs_y[:, k, j]
            for k in range(probs_y.shape[1])
            for j in range(probs_y.shape[2])
        }
    )
    return out


def _bnn_statistics(draws):
    """Invariant to hidden-unit permutations and sign flips: the network's output at three
    inputs, and the noise precision."""
    X = d.bnn()["X"][[0, 25, 49]]
    z1 = np.tanh(np.einsum("nd,sdh->snh", X, draws["w1"]))
    z2 = np.tanh(np.einsum("snh,shk->snk", z1, draws["w2"]))
    out = np.einsum("snk,sky->sny", z2, draws["w3"])[..., 0]
    return {"prec_obs": np.asarray(draws["prec_obs"]), **{f"f(x[{i}])": out[:, j] for j, i in enumerate((1, 26, 50))}}


def _missing_statistics(draws):
    unobserved = np.asarray(draws["y_unobserved"])
    missing = np.flatnonzero(~d.missing()["mask"])
    return {
        "mu": np.asarray(draws["mu"]),
        "sigma": np.asarray(draws["sigma"]),
        **{f"y_missing[{i + 1}]": unobserved[:, i] for i in missing},
    }


def _flat(draws):
    from . import flat_statistics

    return flat_statistics(draws)


def _horseshoe_statistics(draws):
    """The scaled coefficients (a deterministic site), the global scale and the precision."""
    return _flat({"betas": draws["betas"], "tau": draws["tau"], "prec_obs": draws["prec_obs"]})


def _centered_statistics(draws):
    return {
        "mu": np.asarray(draws["mu"]),
        "tau": np.asarray(draws["tau"]),
        **{f"theta[{j + 1}]": np.asarray(draws["theta"])[:, j] for j in range(8)},
    }


ENTRIES = [
    dict(
        name="coin_fairness",
        kind="glm",
        features=("loop of observed sites", "closed form"),
        source="Pyro tutorial 'SVI Part I' " + PYRO + "tutorial/source/svi_part_i.ipynb",
        data=d.coin_flips,
        inputs=lambda x: (glm.coin_fairness, (tensor(x["data"]),), {}),
        sites=("latent_fairness",),
        closed_form=cf.coin_moments,
        closed_draws=cf.coin_draws,
        fast=True,
    ),
    dict(
        name="coin_fairness_subsampled",
        kind="glm",
        features=("plate subsample_size", "closed form"),
        source="Pyro tutorial 'SVI Part II' " + PYRO + "tutorial/source/svi_part_ii.ipynb",
        data=d.coin_flips,
        inputs=lambda x: (glm.coin_fairness_subsampled, (tensor(x["data"]),), {}),
        sites=("latent_fairness",),
        closed_form=cf.coin_moments,
        closed_draws=cf.coin_draws,
        # run_nuts runs a subsampled plate over every index (model_handlers.full_plates), so
        # NUTS samples the full-data posterior, checked against the closed form.
    ),
    dict(
        name="conditioned_scale",
        kind="glm",
        features=("pyro.condition", "closed form"),
        source="Pyro tutorial 'Introduction to Pyro' " + PYRO + "tutorial/source/intro_long.ipynb",
        data=lambda: {"guess": 8.5},
        inputs=lambda x: (glm.conditioned_scale, (torch.tensor(x["guess"]),), {}),
        sites=("weight",),
        closed_form=cf.scale_moments,
        closed_draws=cf.scale_draws,
        fast=True,
    ),
    dict(
        name="logistic_docstring",
        kind="glm",
        features=("closure over data", "no plate"),
        source="Pyro pyro.infer.mcmc.NUTS docstring " + PYRO + "pyro/infer/mcmc/nuts.py",
        data=d.logistic_docstring,
        inputs=lambda x: (glm.make_docstring_logistic(tensor(x["labels"])), (tensor(x["data"]),), {}),
        sites=("beta",),
    ),
    dict(
        name="rugged_pyromodule",
        kind="glm",
        features=("PyroModule", "PyroSample", "nn.Linear"),
        source="Pyro tutorial 'Bayesian Regression - Introduction (Part 1)' "
        + PYRO
        + "tutorial/source/bayesian_regression.ipynb",
        data=d.rugged,
        note="simulated stand-in for the ruggedness data (download)",
        inputs=lambda x: (
            glm.BayesianRegression(3, 1),
            (
                tensor(np.stack([x["is_cont_africa"], x["ruggedness"], x["is_cont_africa"] * x["ruggedness"]], -1)),
                tensor(x["log_gdp"]),
            ),
            {},
        ),
        sites=("linear.weight", "linear.bias", "sigma"),
    ),
    dict(
        name="rugged_function",
        kind="glm",
        features=("Uniform scale prior",),
        source="Pyro tutorial 'Bayesian Regression - Inference Algorithms (Part 2)' "
        + PYRO
        + "tutorial/source/bayesian_regression_ii.ipynb",
        data=d.rugged,
        note="simulated stand-in for the ruggedness data (download)",
        inputs=lambda x: (
            glm.rugged_model,
            (tensor(x["is_cont_africa"]), tensor(x["ruggedness"]), tensor(x["log_gdp"])),
            {},
        ),
        sites=("a", "bA", "bR", "bAR", "sigma"),
        fast=True,
    ),
    dict(
        name="kline_poisson",
        kind="glm",
        features=("Poisson GLM", "a[cid] indexing", "no plate"),
        source="Statistical Rethinking 2nd ed. m11.10, NumPyro port " + RETHINKING,
        data=d.kline,
        inputs=lambda x: (glm.kline_poisson, (_long(x["cid"]), tensor(x["P_std"]), tensor(x["T"])), {}),
        sites=("a", "b"),
    ),
    dict(
        name="kline_gamma_poisson",
        kind="glm",
        features=("negative binomial", "b[cid] indexing"),
        source="Statistical Rethinking 2nd ed. m12.2, NumPyro port " + RETHINKING,
        data=d.kline,
        inputs=lambda x: (glm.kline_gamma_poisson, (tensor(x["T"]), tensor(x["P"]), _long(x["cid"])), {}),
        sites=("a", "b", "g", "phi"),
    ),
    dict(
        name="robust_regression",
        kind="glm",
        features=("Student-t", "flat priors (ImproperUniform)"),
        source="Stan User's Guide 'Robust noise models' " + STAN_GUIDE + "regression.html",
        data=d.robust,
        note="simulated data",
        inputs=lambda x: (glm.robust_regression, (tensor(x["x"]), tensor(x["y"]), x["nu"]), {}),
        sites=("alpha", "beta", "sigma"),
    ),
    dict(
        name="ordered_logistic",
        kind="glm",
        features=("ordinal", "ordered_vector", "flat priors (ImproperUniform)"),
        source="Stan User's Guide 'Ordered logistic regression' " + STAN_GUIDE + "regression.html",
        data=d.ordinal,
        note="simulated data; categories 0-based",
        inputs=lambda x: (glm.ordered_logistic, (tensor(x["x"]), _long(x["y"]), x["K"]), {}),
        sites=("beta", "c"),
    ),
    dict(
        name="horseshoe",
        kind="glm",
        features=("pyro.deterministic", "heavy tails"),
        source="NumPyro example 'Horseshoe Regression' " + NUMPYRO + "examples/horseshoe_regression.py",
        data=d.horseshoe,
        note="D_X = 8 instead of 32 to stay small",
        inputs=lambda x: (glm.horseshoe_normal, (tensor(x["X"]), tensor(x["Y"])), {}),
        sites=("lambdas", "tau", "unscaled_betas", "prec_obs"),
        statistics=_horseshoe_statistics,
    ),
    dict(
        name="poll_dirichlet_multinomial",
        kind="glm",
        features=("Dirichlet", "Multinomial", "closed form"),
        source="Gelman et al., Bayesian Data Analysis 3rd ed., section 3.4 (pre-election poll)",
        data=d.poll,
        inputs=lambda x: (glm.poll_dirichlet_multinomial, (tensor(x["counts"]),), {}),
        sites=("theta",),
        closed_form=cf.poll_moments,
        closed_draws=cf.poll_draws,
    ),
    dict(
        name="eight_schools_centered",
        kind="hierarchical",
        features=("funnel", "centred"),
        source="NumPyro README (eight schools) https://github.com/pyro-ppl/numpyro#a-simple-example---8-schools",
        data=d.eight_schools,
        note="reference: the non-centred twin (same posterior)",
        inputs=lambda x: (hierarchical.eight_schools_centered, (x["J"], tensor(x["sigma"]), tensor(x["y"])), {}),
        sites=("mu", "tau", "theta"),
        statistics=_centered_statistics,
    ),
    dict(
        name="eight_schools_noncentered",
        kind="hierarchical",
        features=("TransformReparam", "poutine.reparam"),
        source="NumPyro README (eight schools, non-centred) https://github.com/pyro-ppl/numpyro",
        data=d.eight_schools,
        inputs=lambda x: (hierarchical.eight_schools_noncentered, (x["J"], tensor(x["sigma"]), tensor(x["y"])), {}),
        sites=("mu", "tau", "theta_base"),
    ),
    dict(
        name="baseball_fully_pooled",
        kind="hierarchical",
        features=("closed form",),
        source="Pyro example 'baseball' " + PYRO + "examples/baseball.py",
        data=d.baseball,
        inputs=lambda x: (hierarchical.fully_pooled, (tensor(x["at_bats"]), tensor(x["hits"])), {}),
        sites=("phi",),
        closed_form=cf.fully_pooled_moments,
        fast=True,
        closed_draws=cf.fully_pooled_draws,
    ),
    dict(
        name="baseball_not_pooled",
        kind="hierarchical",
        features=("closed form", "plate"),
        source="Pyro example 'baseball' " + PYRO + "examples/baseball.py",
        data=d.baseball,
        inputs=lambda x: (hierarchical.not_pooled, (tensor(x["at_bats"]), tensor(x["hits"])), {}),
        sites=("phi",),
        closed_form=cf.not_pooled_moments,
        closed_draws=cf.not_pooled_draws,
    ),
    dict(
        name="baseball_partially_pooled",
        kind="hierarchical",
        features=("Pareto", "Beta"),
        source="Pyro example 'baseball' " + PYRO + "examples/baseball.py",
        data=d.baseball,
        inputs=lambda x: (hierarchical.partially_pooled, (tensor(x["at_bats"]), tensor(x["hits"])), {}),
        sites=("m", "kappa", "phi"),
    ),
    dict(
        name="baseball_partially_pooled_logit",
        kind="hierarchical",
        features=("HalfCauchy", "logits"),
        source="Pyro example 'baseball' " + PYRO + "examples/baseball.py",
        data=d.baseball,
        inputs=lambda x: (hierarchical.partially_pooled_with_logit, (tensor(x["at_bats"]), tensor(x["hits"])), {}),
        sites=("loc", "scale", "alpha"),
    ),
    dict(
        name="ucbadmit_glmm",
        kind="hierarchical",
        features=("LKJCholesky", "v[dept, 0] indexing", "z.T"),
        source="NumPyro example 'Generalized Linear Mixed Models' " + NUMPYRO + "examples/ucbadmit.py",
        data=d.ucbadmit,
        inputs=lambda x: (
            hierarchical.glmm,
            (_long(x["dept"]), tensor(x["male"]), tensor(x["applications"]), tensor(x["admit"])),
            {},
        ),
        sites=("v_mu", "sigma", "L_Rho", "z"),
    ),
    dict(
        name="cafe_varying_slopes",
        kind="hierarchical",
        features=("LKJ", "torch.outer", "a_cafe[cafe] indexing"),
        source="Statistical Rethinking 2nd ed. m14.1, NumPyro port " + RETHINKING,
        data=d.cafe,
        note="site 'a_cafe,b_cafe' holds (a, b) per cafe",
        inputs=lambda x: (
            hierarchical.cafe_varying_slopes,
            (_long(x["cafe"]), tensor(x["afternoon"]), tensor(x["wait"])),
            {},
        ),
        sites=("a", "b", "sigma_cafe", "sigma", "Rho", "a_cafe,b_cafe"),
    ),
    dict(
        name="osic_varying_slopes",
        kind="hierarchical",
        features=("α[patient] indexing", "Greek site names"),
        source="NumPyro tutorial 'Bayesian Hierarchical Linear Regression' "
        "https://num.pyro.ai/en/stable/tutorials/bayesian_hierarchical_linear_regression.html",
        data=d.osic,
        note="simulated stand-in for the OSIC data (10 patients x 9 visits)",
        inputs=lambda x: (
            hierarchical.osic_hierarchical,
            (_long(x["patient_code"]), tensor(x["Weeks"]), tensor(x["FVC_obs"])),
            {},
        ),
        sites=("μ_α", "σ_α", "μ_β", "σ_β", "α", "β", "σ"),
    ),
    dict(
        name="lkj_covariance",
        kind="hierarchical",
        features=("LKJCholesky", "torch.mm"),
        source="Pyro example 'LKJ' " + PYRO + "examples/lkj.py",
        data=d.lkj,
        note="n = 100, d = 3 instead of 500 x 5",
        inputs=lambda x: (hierarchical.lkj_model, (tensor(x["y"]),), {}),
        sites=("theta", "L_omega"),
    ),
    dict(
        name="gp_tutorial",
        kind="gp",
        features=("pyro.contrib.gp", "PyroSample", "pyro.param (noise)", "Cholesky"),
        source="Pyro tutorial 'Gaussian Processes' " + PYRO + "tutorial/source/gp.ipynb",
        data=d.gp_tutorial,
        note="the reference (NumPyro twin) holds the noise at the PyroParam's initial 1.0",
        inputs=lambda x: (gp.make_gp_tutorial(tensor(x["X"]), tensor(x["y"])), (), {}),
        sites=("kernel.lengthscale", "kernel.variance"),
        # NUTS would condition on whatever the param store holds for the learned noise
        options={"nuts_refusal": "learned parameter", "compare_refusal": "learned parameter"},
    ),
    dict(
        name="gp_numpyro",
        kind="gp",
        features=("MultivariateNormal covariance_matrix", "kernel hyperparameters"),
        source="NumPyro example 'Gaussian Process' " + NUMPYRO + "examples/gp.py",
        data=d.gp_numpyro,
        inputs=lambda x: (gp.gp_numpyro, (tensor(x["X"]), tensor(x["Y"])), {}),
        sites=("kernel_var", "kernel_noise", "kernel_length"),
    ),
    dict(
        name="gp_latent_classifier",
        kind="gp",
        features=("torch.linalg.cholesky", "latent GP", "Bernoulli"),
        source="Stan User's Guide 'Gaussian processes' " + STAN_GUIDE + "gaussian-processes.html",
        data=d.gp_classification,
        note="simulated data",
        inputs=lambda x: (gp.gp_latent_classifier, (tensor(x["x"]), tensor(x["z"])), {}),
        sites=("rho", "alpha", "a", "eta"),
    ),
    dict(
        name="gmm_enumerated",
        kind="discrete",
        features=("config_enumerate", "label switching"),
        source="Pyro tutorial 'Gaussian Mixture Model' " + PYRO + "tutorial/source/gmm.ipynb",
        data=d.gmm,
        inputs=lambda x: (discrete.gmm_model, (tensor(x["data"]),), {}),
        sites=("weights", "scale", "locs"),
        statistics=_gmm_statistics,
    ),
    dict(
        name="coal_change_point",
        kind="discrete",
        features=("enumerated change point", "closed form"),
        source="Stan User's Guide 'Change point models' " + STAN_GUIDE + "latent-discrete.html",
        data=d.coal,
        note="r_e = r_l = 1",
        inputs=lambda x: (discrete.coal_change_point, (tensor(x["D"]), x["r_e"], x["r_l"]), {}),
        sites=("e", "l"),
        closed_form=cf.coal_moments,
        closed_draws=cf.coal_draws,
    ),
    dict(
        name="hmm_model_1",
        kind="discrete",
        features=("pyro.markov", "sequential plate", "enumeration"),
        source="Pyro example 'hmm' (model_1) " + PYRO + "examples/hmm.py",
        data=d.hmm,
        note="3 simulated sequences instead of JSB chorales; hidden_dim = 2",
        inputs=lambda x: (
            discrete.hmm_model_1,
            (tensor(x["sequences"]), _long(x["lengths"]), SimpleNamespace(hidden_dim=2)),
            {},
        ),
        sites=("probs_x", "probs_y"),
        statistics=_hmm_statistics,
        # its label modes are not mirror images (the chain starts from state 0): see modes.py
        options={"fold": HMM_FOLD},
    ),
    dict(
        name="ar2_for_loop",
        kind="timeseries",
        features=("140 observed sites in a loop",),
        source="NumPyro example 'AR2 process' " + NUMPYRO + "examples/ar2.py",
        data=d.ar2,
        note="data drawn with NumPy's generator instead of a JAX key",
        inputs=lambda x: (timeseries.ar2_for_loop, (tensor(x["y"]),), {}),
        sites=("alpha_1", "alpha_2", "const", "sigma"),
    ),
    dict(
        name="stochastic_volatility",
        kind="timeseries",
        features=("random walk", "Student-t", "100 latents"),
        source="NumPyro example 'Stochastic Volatility' " + NUMPYRO + "examples/stochastic_volatility.py",
        data=d.stochastic_volatility,
        note="100 simulated returns instead of the S&P 500 download; GaussianRandomWalk as cumsum",
        inputs=lambda x: (timeseries.stochastic_volatility, (tensor(x["returns"]),), {}),
        sites=("sigma", "nu", "s"),
        statistics=lambda s: {
            "sigma": np.asarray(s["sigma"]),
            "nu": np.asarray(s["nu"]),
            **{f"s[{t + 1}]": np.asarray(s["s"])[:, t] for t in (0, 49, 99)},
        },
    ),
    dict(
        name="missing_obs_mask",
        kind="timeseries",
        features=("obs_mask", "flat priors (ImproperUniform)", "closed form"),
        source="Stan User's Guide 'Missing data' " + STAN_GUIDE + "missing-data.html",
        data=d.missing,
        inputs=lambda x: (timeseries.missing_normal, (tensor(x["y"]), torch.as_tensor(x["mask"])), {}),
        sites=("mu", "sigma"),
        statistics=_missing_statistics,
        closed_form=cf.missing_moments,
        closed_draws=cf.missing_draws,
    ),
    dict(
        name="bnn",
        kind="network",
        features=("shape asserts", "permutation symmetry"),
        source="NumPyro example 'Bayesian Neural Network' " + NUMPYRO + "examples/bnn.py",
        data=d.bnn,
        note="D_H = 5",
        inputs=lambda x: (timeseries.bnn_model, (tensor(x["X"]), tensor(x["Y"]), 5), {}),
        sites=("w1", "w2", "w3", "prec_obs"),
        statistics=_bnn_statistics,
    ),
    dict(
        name="lotka_volterra",
        kind="ode",
        features=("ODE (torch RK4 loop)", "TruncatedNormal written by the user", "z[0] indexing"),
        source="NumPyro example 'Predator-Prey Model' https://num.pyro.ai/en/0.7.2/examples/ode.html",
        data=d.lynx_hare,
        note="jax odeint (adaptive) as a fixed-step RK4 loop in torch, 4 steps a year",
        inputs=lambda x: (ode.lotka_volterra, (len(x["y"]), tensor(x["y"])), {}),
        sites=("z_init", "theta", "sigma"),
    ),
]
