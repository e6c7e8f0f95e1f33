"""Is the client-level DP accountant's ε right? The run's books against independent computations.

    python bench/client_dp_accountants.py [--epsilons 1,3,8] [--rounds 3,10,100] [--out docs]

For each target ε and number of rounds T: σ calibrated by the run's default accountant
(server/client_accountant.py: dp-accounting's PLD behind Flower's protocol), then the ε of T
Gaussian releases of that σ (no amplification, add/remove one site, δ 1e-5) by
- the run's books (``epsilon-pld``);
- Opacus' PRV accountant, sample rate 1 (``epsilon-prv``; independent code and method);
- the closed form: T Gaussians of σ are one Gaussian of σ/√T, whose exact ε at δ solves the
  analytic Gaussian mechanism's δ(ε) (Balle & Wang 2018) (``epsilon-closed-form``);
- Flower's ``RdpAccountant`` (``epsilon-rdp``: the old default);
with the σ Flower's RDP would have calibrated for the same target (``noise-multiplier-rdp``).
Writes ``client-dp-accountants.csv`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import math
import warnings
from pathlib import Path

from opacus.accountants import PRVAccountant
from scipy.optimize import brentq
from scipy.stats import norm

from server.client_accountant import calibrate, epsilon_after

DELTA = 1e-5


def prv_epsilon(sigma: float, releases: int, delta: float) -> float:
    """Opacus' PRV ε of ``releases`` Gaussians (sample rate 1: no amplification)."""
    prv = PRVAccountant()
    prv.history = [(sigma, 1.0, releases)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' log(1 - q) at q = 1, its RDP domain's alphas
        return float(prv.get_epsilon(delta, eps_error=0.01))


def closed_form_epsilon(sigma: float, releases: int, delta: float) -> float:
    """The exact ε at δ of one Gaussian of multiplier σ/√T (= T Gaussians of σ)."""
    s = sigma / math.sqrt(releases)

    def excess(eps: float) -> float:
        return norm.cdf(0.5 / s - eps * s) - math.exp(eps) * norm.cdf(-0.5 / s - eps * s) - delta

    return float(brentq(excess, 0.0, 500.0))


def row(epsilon: float, releases: int) -> dict:
    """One (target ε, T) point: σ by the default (PLD) accountant, its ε four ways."""
    sigma = calibrate(epsilon, releases, DELTA, "pld")
    out = {"target-epsilon": epsilon, "rounds": releases, "delta": DELTA, "noise-multiplier": sigma}
    out |= {
        "epsilon-pld": epsilon_after(sigma, releases, DELTA, "pld"),
        "epsilon-prv": prv_epsilon(sigma, releases, DELTA),
        "epsilon-closed-form": closed_form_epsilon(sigma, releases, DELTA),
        "epsilon-rdp": epsilon_after(sigma, releases, DELTA, "rdp"),
        "noise-multiplier-rdp": calibrate(epsilon, releases, DELTA, "rdp"),
    }
    return out


def main(argv: list[str] | None = None) -> None:
    """Compute the grid, write the CSV, print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--rounds", default="3,10,100")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args(argv)
    rows = [
        row(float(e), int(t)) for e in args.epsilons.split(",") for t in args.rounds.split(",")
    ]  # fmt: skip
    path = Path(args.out) / "client-dp-accountants.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("| target ε | rounds | σ (PLD) | PLD ε (the books) | Opacus PRV ε | closed form ε | Flower RDP ε "
          "| max abs(PLD − independent) | σ Flower's RDP would use |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gap = max(abs(r["epsilon-pld"] - r["epsilon-prv"]), abs(r["epsilon-pld"] - r["epsilon-closed-form"]))
        print(
            f"| {r['target-epsilon']:g} | {r['rounds']} | {r['noise-multiplier']:.4g} "
            f"| {r['epsilon-pld']:.4f} | {r['epsilon-prv']:.4f} | {r['epsilon-closed-form']:.4f} "
            f"| {r['epsilon-rdp']:.4f} | {gap:.4f} "
            f"| {r['noise-multiplier-rdp']:.4g} |"
        )
    print(f"CSV: {path}")


if __name__ == "__main__":
    main()
