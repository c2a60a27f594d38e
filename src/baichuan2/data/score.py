"""Per-document sampling weights from quality, redundancy and source (Baichuan 2 scores its data and
samples pre-training data by those scores).

weight = source_weight[source]
         * quality ** quality_exponent
         * dup_count ** dup_exponent                  (how often the text occurred before dedup)
         * (semantic cluster size / mean size) ** -density_exponent
         * safety upsample factor (when a safety-positive term is present)
normalised to mean 1 over the kept corpus, so a weight reads as "times its uniform share".

Defaults follow the evidence summarised in docs/data.md: mild up-weighting of widely replicated text
(FineWeb kept cross-dump duplicates as implicit up-sampling) and down-weighting of dense semantic
clusters (SoftDedup/D4 show reweighting redundant regions beats deleting them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ScoreArgs:
    """Args:
        source_weights: Multiplier per source tag (missing sources get default_source_weight).
        default_source_weight: Weight of sources not in source_weights.
        quality_exponent: Exponent on the quality score in (0, 1].
        dup_exponent: Exponent on the pre-dedup copy count (0 ignores it, >0 up-weights popular text).
        density_exponent: Exponent on the relative semantic cluster size (>0 down-weights dense topics).
        max_weight: Cap after normalisation so one document cannot dominate the mixture.
    """

    source_weights: dict[str, float] = field(default_factory=dict)
    default_source_weight: float = 1.0
    quality_exponent: float = 1.0
    dup_exponent: float = 0.25
    density_exponent: float = 0.5
    max_weight: float = 20.0


def sampling_weights(sources: list[str], quality: np.ndarray, dup_count: np.ndarray, cluster_size: np.ndarray,
                     upsample: np.ndarray, upsample_factor: float, args: ScoreArgs) -> np.ndarray:
    if len(sources) == 0:
        return np.zeros(0)
    src = np.array([args.source_weights.get(s, args.default_source_weight) for s in sources], dtype=np.float64)
    density = cluster_size / cluster_size.mean()
    w = (src * np.power(np.clip(quality, 1e-6, 1.0), args.quality_exponent)
         * np.power(np.maximum(dup_count, 1), args.dup_exponent)
         * np.power(density, -args.density_exponent)
         * np.where(upsample, upsample_factor, 1.0))
    if w.sum() <= 0:
        raise ValueError("all sampling weights are zero: check score.source_weights")
    w = w / w.mean()
    w = np.minimum(w, args.max_weight)
    return w / w.mean()
