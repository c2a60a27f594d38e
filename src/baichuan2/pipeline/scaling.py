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
                    l_inf_bounds: tuple[float, float] | None = None, start: ScalingFit | None = None) -> ScalingFit:
    """Fit ``L = a (C/c0)^b + L_inf`` by robust least squares (needs >= 3 points).

    The problem is non-convex, so it starts from several L_inf guesses; ``start`` (a nearby fit, as in
    the bootstrap) replaces them with one start there."""
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
    starts = []
    if start is not None:
        starts.append(np.array([math.log(max(start.a, 1e-8)), start.b, start.l_inf]))
    else:
        for l_start in np.linspace(lo, hi, 7)[:-1] + (hi - lo) * 0.05:
            span = max(float(y.max() - l_start), 1e-6)
            starts.append(np.array([math.log(min(span, max(float(y[np.argmin(x)] - l_start), 1e-6))), -0.1, l_start]))
    best = None
    for p0 in starts:
        p0 = np.clip(p0, [-20.0, -3.0, lo], [20.0, 0.0, hi])
        res = least_squares(lambda p: _model(p, x) - y, p0, loss="soft_l1", f_scale=0.01,
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


def bootstrap_fits(fit: ScalingFit, compute: Sequence[float], loss: Sequence[float], samples: int = 200,
                   seed: int = 0, progress: bool = False) -> list[ScalingFit]:
    """Parametric bootstrap: refit ``samples`` copies of the fitted curve plus Gaussian noise of the fit's
    rms residual (each refit starts from the fit, so it takes milliseconds)."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    c = np.asarray(compute, dtype=float)
    base = fit.predict(c)
    sigma = max(fit.residual_rms, 1e-6)
    fits = []
    for _ in tqdm(range(samples), desc="bootstrapping the fit", unit="fit", disable=not progress, leave=False):
        noisy = base + rng.normal(0.0, sigma, size=len(c))
        try:
            fits.append(fit_scaling_law(c, noisy, c0=fit.c0, start=fit))
        except (ValueError, RuntimeError):
            continue
    return fits


def prediction_interval(fit: ScalingFit, compute: Sequence[float], loss: Sequence[float], target: float,
                        samples: int = 200, seed: int = 0, fits: list[ScalingFit] | None = None) -> tuple[float, float]:
    """5-95% interval of the predicted loss at ``target`` compute by parametric bootstrap of the residuals."""
    fits = bootstrap_fits(fit, compute, loss, samples, seed) if fits is None else fits
    if not fits:
        return float("nan"), float("nan")
    preds = [float(f.predict(target)) for f in fits]
    return float(np.percentile(preds, 5)), float(np.percentile(preds, 95))


def plot_scaling_law(path: str | Path, compute: Sequence[float], loss: Sequence[float], fit: ScalingFit,
                     labels: Sequence[str] | None = None, target: tuple[str, float] | None = None,
                     actual: float | None = None, interval: tuple[float, float] | None = None,
                     band: Sequence[ScalingFit] = (), loss_name: str = "held-out loss") -> Path:
    """Log-x plot of the ladder's losses, the fitted curve with its bootstrap 5-95% band, and the prediction.

    The y-axis spans the data (points, prediction, actual), not zero: the curve's interesting part is a
    few hundredths of a nat, and L_inf is named in the legend rather than drawn far below the points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from baichuan2.utils.io import atomic_open

    c = np.asarray(compute, dtype=float)
    y = np.asarray(loss, dtype=float)
    right = max(c.max(), target[1] if target else c.max()) * 2
    grid = np.logspace(math.log10(c.min() / 2), math.log10(right), 200)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    if band:
        curves = np.array([f.predict(grid) for f in band])
        ax.fill_between(grid, np.percentile(curves, 5, axis=0), np.percentile(curves, 95, axis=0), color="tab:blue",
                        alpha=0.15, linewidth=0, label="fit, bootstrap 5-95% band")
    ax.plot(grid, fit.predict(grid), "-", color="tab:blue",
            label=f"fit: L = {fit.a:.3g}·(C/{fit.c0:.2g})^{fit.b:.3f} + {fit.l_inf:.3f} (L∞)")
    ax.scatter(c, y, color="tab:blue", zorder=3, label=f"ladder rungs ({loss_name})")
    for i, name in enumerate(labels or []):
        ax.annotate(name, (c[i], y[i]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    shown = list(y)
    if target:
        name, tc = target
        pred = float(fit.predict(tc))
        shown.append(pred)
        if interval and all(math.isfinite(v) for v in interval):
            ax.errorbar([tc], [pred], yerr=[[max(pred - interval[0], 0)], [max(interval[1] - pred, 0)]], fmt="*",
                        color="tab:red", markersize=13, capsize=5, zorder=4,
                        label=f"predicted {name}: {pred:.3f} (5-95%: {interval[0]:.3f}-{interval[1]:.3f})")
            shown += list(interval)
        else:
            ax.scatter([tc], [pred], marker="*", s=160, color="tab:red", zorder=4, label=f"predicted {name}: {pred:.3f}")
        if actual is not None:
            ax.scatter([tc], [actual], marker="x", s=90, color="black", zorder=5,
                       label=f"actual {name}: {actual:.3f} ({100 * abs(pred - actual) / actual:.2f}% error)")
            shown.append(actual)
    lo, hi = min(shown), max(shown)
    pad = max(0.08 * (hi - lo), 0.01)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(loss_name)
    ax.set_title("Scaling law L(C) = a·C^b + L∞, fitted on the ladder, extrapolated to the target")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)  # off the points
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
