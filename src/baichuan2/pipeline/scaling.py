"""Scaling laws as in Baichuan 2 (section 2.6): L(C) = a * C^b + L_inf, C = training FLOPs.

Baichuan 2 trained models from 10M to 3B parameters and fitted this curve to
predict the final loss of the 7B and 13B runs before training them.  Here:

  * ``plan_ladder``: pick rungs (model presets) and token budgets so compute
    spans the requested range; FLOPs per token come from
    ``ModelConfig.flops_per_token``, the same count the trainer's MFU uses;
  * ``fit_scaling_law``: robust least squares (SciPy, soft-L1 loss) in a
    normalised compute unit, with parameter uncertainties from the Jacobian and
    a prediction interval by parametric bootstrap;
  * ``plot_scaling_law``: points, fit, prediction (and the held-out actual) to PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from baichuan2.model.config import ModelConfig


@dataclass
class Rung:
    name: str  # run name
    preset: str  # ModelConfig preset
    params: int  # non-embedding parameters
    tokens: int  # training tokens
    flops: float  # total training FLOPs = flops_per_token * tokens
    overrides: dict = field(default_factory=dict)  # ModelConfig overrides (vocab size, context)


def plan_ladder(presets: Sequence[str], seq_len: int, vocab_size: int, tokens_per_param: float = 20.0,
                min_tokens: int = 0, max_tokens: int | None = None) -> list[Rung]:
    """One rung per preset with ``tokens = tokens_per_param x non-embedding params`` (clamped).

    A fixed tokens-per-parameter ratio keeps every rung at the same point of its own
    learning curve, so final losses trace the compute-efficient frontier L(C).
    """
    rungs = []
    for preset in presets:
        cfg = ModelConfig.from_name(preset, vocab_size=vocab_size, max_position_embeddings=seq_len)
        params = cfg.num_params(non_embedding=True)
        tokens = int(max(min_tokens, tokens_per_param * params))
        if max_tokens is not None:
            tokens = min(tokens, max_tokens)
        tokens = max(seq_len, tokens // seq_len * seq_len)
        rungs.append(Rung(name=preset, preset=preset, params=params, tokens=tokens,
                          flops=cfg.flops_per_token(seq_len) * tokens,
                          overrides={"vocab_size": vocab_size, "max_position_embeddings": seq_len}))
    return sorted(rungs, key=lambda r: r.flops)


@dataclass
class ScalingFit:
    a: float
    b: float
    l_inf: float
    a_std: float
    b_std: float
    l_inf_std: float
    c0: float  # compute unit: L = a * (C / c0)^b + l_inf
    residual_rms: float
    n_points: int

    def predict(self, compute: float | np.ndarray) -> float | np.ndarray:
        return self.a * (np.asarray(compute, dtype=float) / self.c0) ** self.b + self.l_inf

    def to_dict(self) -> dict:
        return asdict(self)


def _model(params: np.ndarray, x: np.ndarray) -> np.ndarray:
    log_a, b, l_inf = params
    return np.exp(log_a) * x**b + l_inf


def fit_scaling_law(compute: Sequence[float], loss: Sequence[float], c0: float | None = None,
                    l_inf_bounds: tuple[float, float] | None = None) -> ScalingFit:
    """Fit ``L = a (C/c0)^b + L_inf`` by robust least squares (needs >= 3 points)."""
    from scipy.optimize import least_squares

    c = np.asarray(compute, dtype=float)
    y = np.asarray(loss, dtype=float)
    if c.shape != y.shape or c.ndim != 1:
        raise ValueError("compute and loss must be 1-D sequences of equal length")
    if len(c) < 3:
        raise ValueError(f"a three-parameter fit needs at least 3 points, got {len(c)}")
    if np.any(c <= 0) or not np.all(np.isfinite(c)) or not np.all(np.isfinite(y)):
        raise ValueError("compute must be positive and losses finite")
    c0 = float(c0 or c.min())
    x = c / c0
    lo, hi = l_inf_bounds or (0.0, float(y.min()) - 1e-6)
    hi = max(hi, lo + 1e-6)
    best = None
    for l_start in np.linspace(lo, hi, 7)[:-1] + (hi - lo) * 0.05:  # several starts: the problem is non-convex
        span = max(float(y.max() - l_start), 1e-6)
        start = np.array([math.log(max(float(y[np.argmin(x)]) - l_start, 1e-6)), -0.1, l_start])
        start[0] = math.log(min(span, max(float(y[np.argmin(x)] - l_start), 1e-6)))
        res = least_squares(lambda p: _model(p, x) - y, start, loss="soft_l1", f_scale=0.01,
                            bounds=([-20.0, -3.0, lo], [20.0, 0.0, hi]))
        if best is None or res.cost < best.cost:
            best = res
    log_a, b, l_inf = best.x
    residuals = _model(best.x, x) - y
    dof = max(len(y) - 3, 1)
    s2 = float(residuals @ residuals) / dof
    try:
        cov = np.linalg.pinv(best.jac.T @ best.jac) * s2
        stds = np.sqrt(np.clip(np.diag(cov), 0, None))
    except np.linalg.LinAlgError:
        stds = np.full(3, np.nan)
    a = math.exp(log_a)
    return ScalingFit(a=a, b=float(b), l_inf=float(l_inf), a_std=float(a * stds[0]), b_std=float(stds[1]),
                      l_inf_std=float(stds[2]), c0=c0, residual_rms=float(np.sqrt(np.mean(residuals**2))),
                      n_points=len(y))


def prediction_interval(fit: ScalingFit, compute: Sequence[float], loss: Sequence[float], target: float,
                        samples: int = 200, seed: int = 0) -> tuple[float, float]:
    """5-95% interval of the predicted loss at ``target`` compute by parametric bootstrap of the residuals."""
    rng = np.random.default_rng(seed)
    c = np.asarray(compute, dtype=float)
    base = fit.predict(c)
    sigma = max(fit.residual_rms, 1e-6)
    preds = []
    for _ in range(samples):
        noisy = base + rng.normal(0.0, sigma, size=len(c))
        try:
            preds.append(float(fit_scaling_law(c, noisy, c0=fit.c0).predict(target)))
        except (ValueError, RuntimeError):
            continue
    if not preds:
        return float("nan"), float("nan")
    return float(np.percentile(preds, 5)), float(np.percentile(preds, 95))


def plot_scaling_law(path: str | Path, compute: Sequence[float], loss: Sequence[float], fit: ScalingFit,
                     labels: Sequence[str] | None = None, target: tuple[str, float] | None = None,
                     actual: float | None = None, interval: tuple[float, float] | None = None) -> Path:
    """Log-x plot of the ladder's final losses, the fitted curve and the prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from baichuan2.utils.io import atomic_open

    c = np.asarray(compute, dtype=float)
    right = max(c.max(), target[1] if target else c.max()) * 2
    grid = np.logspace(math.log10(c.min() / 2), math.log10(right), 200)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(grid, fit.predict(grid), "-", color="tab:blue",
            label=f"fit: L = {fit.a:.3g}(C/{fit.c0:.2g})^{fit.b:.3f} + {fit.l_inf:.3f}")
    ax.scatter(c, loss, color="tab:blue", zorder=3, label="ladder (final loss)")
    for i, name in enumerate(labels or []):
        ax.annotate(name, (c[i], loss[i]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if target:
        name, tc = target
        pred = float(fit.predict(tc))
        if interval:
            ax.errorbar([tc], [pred], yerr=[[pred - interval[0]], [interval[1] - pred]], fmt="*", color="tab:red",
                        markersize=12, capsize=4, label=f"predicted {name}: {pred:.3f}")
        else:
            ax.scatter([tc], [pred], marker="*", s=160, color="tab:red", label=f"predicted {name}: {pred:.3f}")
        if actual is not None:
            ax.scatter([tc], [actual], marker="x", s=80, color="black", zorder=4, label=f"actual {name}: {actual:.3f}")
    ax.axhline(fit.l_inf, color="gray", linestyle=":", linewidth=1, label=f"L_inf = {fit.l_inf:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("final loss")
    ax.set_title("Scaling law L(C) = a C^b + L_inf")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)
    return path
