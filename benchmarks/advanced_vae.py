"""Numbers for "beyond the basic VAE": gaps, richer-than-posterior, DMM, MI, multimodal, vMF.

Every section trains on a small budget (stated in its JSON and in docs/lab-notes/benchmarks.md)
because the reference machine has 2 shared CPU cores; the numbers are short-run numbers, not
converged ones.

Usage:
    python benchmarks/advanced_vae.py --section gaps        # item 1
    python benchmarks/advanced_vae.py --section richer      # item 2
    python benchmarks/advanced_vae.py --section dmm         # item 3
    python benchmarks/advanced_vae.py --section mi          # item 4
    python benchmarks/advanced_vae.py --section multimodal  # item 5
    python benchmarks/advanced_vae.py --section vmf         # item 6
Each writes benchmarks/results/advanced_<section>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import pyro
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def _fashion(num_train, num_test):
    from vilab.datasets import load_dataset

    return load_dataset("fashion-mnist", validation_size=1000).subset(num_train=num_train, num_test=num_test)


def _train_loader(data, batch_size=100):
    from vilab.datasets import make_loader

    return make_loader(data.train, data.train_labels, batch_size=batch_size, shuffle=True, dynamic_binarization=True)


def _fit_vae(vae, loader, epochs, loss=None):
    from vilab.inference.vae.minibatch import fit_minibatch
    from vilab.inference.vae.objectives import ELBOLoss

    loss = loss or ELBOLoss()

    def step(batch, _):
        out = loss(vae.model, vae.guide, batch[0])
        return out.loss, {k: float(v) for k, v in out.metrics.items()}

    return fit_minibatch(vae, step, loader, num_epochs=epochs)


def section_gaps(args):
    from vilab.inference.vae.amortization import gap_decomposition, monte_carlo_elbo, refine_locally
    from vilab.models.vae.vae import VAEConfig, build_vae

    data = _fashion(args.num_train, args.num_test)
    rows = []
    for guide in ("meanfield", "iaf"):
        pyro.set_rng_seed(0)
        vae = build_vae(
            VAEConfig(
                data.image_shape,
                latent_dim=16,
                guide=guide,
                num_flows=2,
                encoder_hidden=(300, 300),
                decoder_hidden=(300, 300),
            )
        )
        fit = _fit_vae(vae, _train_loader(data), args.epochs)
        x = data.test
        start = time.perf_counter()
        report = gap_decomposition(
            vae.model,
            vae.guide,
            x,
            refine_steps=args.refine_steps,
            learning_rate=0.01,
            elbo_samples=50,
            iw_samples=1000,
        )
        semi = {}
        for k in (10, 50):
            local = refine_locally(vae.model, vae.guide, x, num_steps=k, learning_rate=0.01).guide
            semi[k] = float(monte_carlo_elbo(vae.model, local, x, num_samples=50).mean())
        rows.append(
            {
                "guide": guide,
                "train_seconds": fit.wall_time,
                "eval_seconds": time.perf_counter() - start,
                "log_likelihood": report.log_likelihood,
                "elbo_amortized": report.elbo_amortized,
                "elbo_local": report.elbo_local,
                "approximation_gap": report.approximation_gap,
                "amortization_gap": report.amortization_gap,
                "stderr": report.stderr,
                "semi_amortized_elbo": semi,
            }
        )
        print(
            f"{guide:>10}: log p(x) {report.log_likelihood:.2f}  ELBO(enc) "
            f"{report.elbo_amortized:.2f}  ELBO(local) {report.elbo_local:.2f}  approx gap "
            f"{report.approximation_gap:.2f}  amort gap {report.amortization_gap:.2f}  "
            f"SA K=10 {semi[10]:.2f} K=50 {semi[50]:.2f}",
            flush=True,
        )
    return {"budget": vars(args), "rows": rows}


def section_richer(args):
    from vilab.inference import fit_svi
    from vilab.models.conjugate import default_regression_data, linear_regression, linear_regression_log_evidence

    torch.set_default_dtype(torch.float64)
    features, y = default_regression_data()
    log_evidence = linear_regression_log_evidence(features, y)
    rows = [{"guide": "exact log p(y)", "elbo": log_evidence, "stderr": 0.0}]
    for guide, options in (("fullrank", {}), ("iaf", {"num_flows": 2}), ("nsf", {"num_flows": 2})):
        fit = fit_svi(
            linear_regression,
            guide,
            features,
            y,
            num_steps=args.svi_steps,
            lr=0.02,
            lr_decay=0.05,
            num_particles=8,
            guide_options=options,
            early_stop=False,
            progress=False,
        )
        elbo, stderr = fit.elbo_estimate(20000)
        rows.append(
            {"guide": guide, "elbo": elbo, "stderr": stderr, "gap": log_evidence - elbo, "seconds": fit.wall_time}
        )
        print(
            f"{guide:>10}: ELBO {elbo:.4f} +- {stderr:.4f}  log p(y) {log_evidence:.4f}  gap {log_evidence - elbo:.4f}",
            flush=True,
        )
    return {"budget": vars(args), "rows": rows}


def _dmm_scores(dmm, x, iw_samples):
    from vilab.inference.vae.amortization import importance_log_likelihood, monte_carlo_elbo

    elbo = monte_carlo_elbo(dmm.model, dmm.guide, x, num_samples=10)
    log_likelihood = importance_log_likelihood(dmm.model, dmm.guide, x, num_samples=iw_samples, chunk_size=100)
    n = x.shape[0]
    return {
        "elbo": float(elbo.mean()),
        "elbo_stderr": float(elbo.std()) / n**0.5,
        "log_likelihood": float(log_likelihood.mean()),
        "log_likelihood_stderr": float(log_likelihood.std()) / n**0.5,
    }


def _fit_dmm(dmm, train, epochs, batch_size):
    from vilab.inference.vae.minibatch import fit_minibatch
    from vilab.inference.vae.objectives import elbo_terms

    def loss(batch, step):
        # KL annealing over the first 500 steps, as Krishnan et al. do.
        terms = elbo_terms(dmm.model, dmm.guide, batch)
        beta = min(1.0, 0.1 + step / 500)
        return (-(terms.reconstruction - beta * terms.kl)).mean(), {}

    batches = [train[i : i + batch_size] for i in range(0, len(train), batch_size)]
    return fit_minibatch(dmm, loss, batches, num_epochs=epochs, learning_rate=3e-3)


def section_dmm(args):
    from vilab.datasets_sequential import load_image_rows, simulate_pendulum
    from vilab.models.vae.dmm import DMM

    rows = []
    pyro.set_rng_seed(0)
    images = load_image_rows(num_train=args.num_train, num_test=args.num_test)
    dmm = DMM(28, 16, rnn_dim=128, transition_dim=64, emission_dim=128)
    fit = _fit_dmm(dmm, images.train, args.epochs, 100)
    scores = _dmm_scores(dmm, images.test, 200)
    context = images.test[:8, :14]
    forecast = dmm.forecast(context, 14, num_samples=1)[0]
    # clone(): a saved view would carry the whole test tensor's storage.
    torch.save(
        {"test": images.test[:8].clone(), "reconstruction": dmm.reconstruct(images.test[:8]), "forecast": forecast},
        os.path.join(RESULTS, "advanced_dmm_fashion.pt"),
    )
    rows.append({"data": "fashion-mnist rows (T=28, F=28)", "train_seconds": fit.wall_time, **scores})
    print(f"fashion rows: ELBO {scores['elbo']:.2f}  IS log p(x) {scores['log_likelihood']:.2f}", flush=True)
    pendulum = simulate_pendulum(1200, 50, seed=0)
    dmm = DMM(2, 4, likelihood="normal", rnn_dim=64, transition_dim=64, emission_dim=64)
    fit = _fit_dmm(dmm, pendulum.train, args.epochs * 4, 50)
    scores = _dmm_scores(dmm, pendulum.test, 200)
    context, future = pendulum.test[:, :30], pendulum.test[:, 30:]
    forecast = dmm.forecast(context, 20, num_samples=20)
    error = (forecast.mean(0) - future).pow(2).mean(-1).sqrt().mean(0)
    baseline = (context[:, -1:] - future).pow(2).mean(-1).sqrt().mean(0)  # persistence
    torch.save(
        {"context": context[:8].clone(), "future": future[:8].clone(), "forecast": forecast[:, :8].clone()},
        os.path.join(RESULTS, "advanced_dmm_pendulum.pt"),
    )
    rows.append(
        {
            "data": "pendulum (T=50, F=2)",
            "train_seconds": fit.wall_time,
            **scores,
            "forecast_rmse_by_horizon": error.tolist(),
            "persistence_rmse_by_horizon": baseline.tolist(),
        }
    )
    print(
        f"pendulum: ELBO {scores['elbo']:.2f}  IS log p(x) {scores['log_likelihood']:.2f}  "
        f"forecast RMSE h=1 {error[0]:.3f} h=10 {error[9]:.3f} h=20 {error[19]:.3f} "
        f"(persistence {baseline[0]:.3f} {baseline[9]:.3f} {baseline[19]:.3f})",
        flush=True,
    )
    return {"budget": vars(args), "rows": rows}


def section_multimodal(args):
    from vilab.inference.vae.minibatch import fit_minibatch
    from vilab.models.vae.multimodal import build_multimodal_vae

    data = _fashion(args.num_train, args.num_test)
    pyro.set_rng_seed(0)
    vae = build_multimodal_vae(data.image_shape, 10, 16)

    def loss(batch, step):
        x, y = batch
        return vae.loss(x, y), {}

    fit = fit_minibatch(vae, loss, _train_loader(data), num_epochs=args.epochs)
    scores = vae.log_likelihoods(data.test, data.test_labels, num_samples=500)
    n = data.test.shape[0]
    summary = {k: float(v.mean()) for k, v in scores.items()}
    summary.update({f"{k}_stderr": float(v.std()) / n**0.5 for k, v in scores.items()})
    labels = torch.arange(10).repeat_interleave(4)
    torch.save(
        {"labels": labels, "images": vae.sample_images(labels)}, os.path.join(RESULTS, "advanced_multimodal_samples.pt")
    )
    print("  ".join(f"{k} {v:.3f}" for k, v in summary.items() if "stderr" not in k), flush=True)
    return {"budget": vars(args), "train_seconds": fit.wall_time, "scores": summary}


def section_vmf(args):
    from vilab.datasets import make_loader
    from vilab.inference.vae.amortization import monte_carlo_elbo
    from vilab.inference.vae.evaluation import active_units, importance_sampled_log_likelihood
    from vilab.models.vae.hyperspherical import HypersphericalELBOLoss, build_hyperspherical_vae
    from vilab.models.vae.vae import VAEConfig, build_vae

    data = _fashion(args.num_train, args.num_test)
    test_loader = make_loader(data.test, batch_size=250)
    rows = []
    for latent_dim in (3, 5, 10):
        for kind in ("normal", "vmf"):
            pyro.set_rng_seed(0)
            if kind == "vmf":
                vae = build_hyperspherical_vae(data.image_shape, latent_dim)
                loss = HypersphericalELBOLoss()
            else:
                vae = build_vae(
                    VAEConfig(
                        data.image_shape, latent_dim=latent_dim, encoder_hidden=(300, 300), decoder_hidden=(300, 300)
                    )
                )
                loss = None
            fit = _fit_vae(vae, _train_loader(data), args.epochs, loss)
            elbo = monte_carlo_elbo(vae.model, vae.guide, data.test, num_samples=10)
            estimate = importance_sampled_log_likelihood(vae, test_loader, num_samples=500, chunk_size=250)
            count, _ = active_units(vae, test_loader, num_samples=50)
            rows.append(
                {
                    "latent_dim": latent_dim,
                    "posterior": kind,
                    "elbo": float(elbo.mean()),
                    "elbo_stderr": float(elbo.std()) / len(elbo) ** 0.5,
                    "log_likelihood": estimate.mean,
                    "log_likelihood_stderr": estimate.stderr,
                    "active_units": count,
                    "train_seconds": fit.wall_time,
                }
            )
            print(
                f"p={latent_dim:>2} {kind:>6}: ELBO {rows[-1]['elbo']:.2f}  log p(x) "
                f"{estimate.mean:.2f} +- {estimate.stderr:.2f}  AU {count}",
                flush=True,
            )
    return {"budget": vars(args), "rows": rows}


def section_mi(args):
    from vilab.datasets import make_loader
    from vilab.inference.vae.amortization import monte_carlo_elbo
    from vilab.inference.vae.mutual_information import InfoVAELoss, MutualInformationLoss
    from vilab.inference.vae.objectives import ELBOLoss
    from vilab.inference.vae.evaluation import collapse_diagnostics, importance_sampled_log_likelihood
    from vilab.models.vae.autoregressive import build_autoregressive_vae

    data = _fashion(args.num_train, args.num_test)
    test_loader = make_loader(data.test, batch_size=100)
    objectives = {
        "elbo": ELBOLoss(),
        "infovae (alpha=1, lambda=100, IMQ)": InfoVAELoss(),
        "elbo + 1.0 * MI": MutualInformationLoss(1.0),
    }
    keys = {"elbo": "elbo", "infovae": "infovae (alpha=1, lambda=100, IMQ)", "mi": "elbo + 1.0 * MI"}
    chosen = [keys[k] for k in args.objectives.split(",")] if args.objectives else list(objectives)
    rows = []
    for name in chosen:
        loss = objectives[name]
        pyro.set_rng_seed(0)
        vae = build_autoregressive_vae(data.image_shape, 16)
        fit = _fit_vae(vae, _train_loader(data), args.epochs, loss)
        elbo = monte_carlo_elbo(vae.model, vae.guide, data.test, num_samples=5)
        estimate = importance_sampled_log_likelihood(vae, test_loader, num_samples=200, chunk_size=50)
        report = collapse_diagnostics(vae, test_loader)
        rows.append(
            {
                "objective": name,
                "elbo": float(elbo.mean()),
                "kl": float(report.kl_per_dim.sum()) if report.kl_per_dim is not None else None,
                "log_likelihood": estimate.mean,
                "log_likelihood_stderr": estimate.stderr,
                "active_units": report.active_units,
                "mutual_information": report.mutual_information,
                "kl_per_dim": None if report.kl_per_dim is None else report.kl_per_dim.tolist(),
                "unit_variances": report.unit_variances.tolist(),
                "train_seconds": fit.wall_time,
            }
        )
        print(
            f"{name:>36}: ELBO {rows[-1]['elbo']:.2f}  log p(x) {estimate.mean:.2f}  KL "
            f"{rows[-1]['kl']:.2f}  AU {report.active_units}/16  MI "
            f"{report.mutual_information:.3f}",
            flush=True,
        )
    return {"budget": vars(args), "rows": rows}


SECTIONS = {
    "mi": section_mi,
    "gaps": section_gaps,
    "richer": section_richer,
    "dmm": section_dmm,
    "multimodal": section_multimodal,
    "vmf": section_vmf,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--section", required=True)
    parser.add_argument("--num-train", type=int, default=5000)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--refine-steps", type=int, default=300)
    parser.add_argument("--svi-steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--objectives", default="", help="mi section: comma-separated subset of elbo,infovae,mi (default all)"
    )
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.section not in SECTIONS:
        parser.error(f"--section: expected one of {', '.join(SECTIONS)}; got {args.section!r}")
    start = time.perf_counter()
    result = SECTIONS[args.section](args)
    result["wall_seconds"] = time.perf_counter() - start
    result["command"] = "python benchmarks/advanced_vae.py " + " ".join(argv or sys.argv[1:])
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"advanced_{args.section}{args.tag}.json"), "w") as file:
        json.dump(result, file, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
