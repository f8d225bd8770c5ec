"""The evaluation's figure: row power over time against the budget's thresholds."""

from __future__ import annotations

from pathlib import Path

from ampacity.power.eval.simulation import Comparison


def plot_row_power(comparison: Comparison, path: Path) -> Path:
    """Write a PNG of row power with the policy and without caps, with T1/T2/limit lines."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or in CI
    import matplotlib.pyplot as plt

    capped, uncapped = comparison.capped, comparison.uncapped
    budget = capped.config.budget
    minutes = capped.times_s / 60.0
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot(minutes, uncapped.row_watts / 1000, color="0.7", linewidth=0.6, label="demand (no caps)")
    ax.plot(minutes, capped.row_watts / 1000, color="tab:blue", linewidth=0.8, label="with policy")
    for watts, label, style in (
        (budget.limit_watts, "limit", "-"),
        (budget.t2_watts, f"T2 ({budget.t2_fraction:.0%})", "--"),
        (budget.t1_watts, f"T1 ({budget.t1_fraction:.0%})", ":"),
    ):
        ax.axhline(watts / 1000, color="tab:red", linestyle=style, linewidth=1.0, label=label)
    cfg = capped.config
    ax.set_title(
        f"{cfg.servers} servers x {cfg.gpus_per_server} H100 "
        f"({cfg.training_fraction:.0%} training) under {budget.limit_watts / 1000:.1f} kW"
    )
    ax.set_xlabel("time (min)")
    ax.set_ylabel("row GPU power (kW)")
    ax.legend(loc="lower right", fontsize=8, ncols=3)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
