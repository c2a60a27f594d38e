"""Near-duplicate detection: shingles -> MinHash signatures -> LSH bands -> verified pairs -> clusters.

Everything after tokenisation is vectorised numpy over a whole batch of documents:

* shingles are 64-bit hashes: each word (English) is hashed once with xxh64, then n-gram hashes are a
  wrapping polynomial of the word hashes; Chinese uses character n-grams (no segmenter needed,
  script-agnostic as in NeMo Curator), hashed the same way from the code points;
* MinHash uses the multiply-shift family h_k(x) = (a_k * x + b_k) >> 32 over uint64 (a_k odd), the
  cheapest 2-universal family that numpy evaluates without overflow tricks, and the per-document
  minimum is one ``np.minimum.reduceat`` over the concatenated shingles of the batch;
* a band key is a 64-bit mix of its ``rows`` values; buckets are found by sorting keys, so the same code
  runs per band on one machine or as independent band tasks on a cluster.

Candidate pairs from a bucket are verified against the bucket's first member (its anchor) with the
signature's Jaccard estimate, and the surviving edges go to scipy's connected components.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xxhash

from baichuan2.data.text import detect_language

_MIX = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio odd constant: polynomial base for n-gram hashes
MAX_HASH = np.uint64(0xFFFFFFFF)


@dataclass(frozen=True)
class MinHashParams:
    """Signature and LSH parameters.  Defaults: 128 permutations, 16 bands x 8 rows, so a pair with Jaccard
    s collides with probability 1-(1-s^8)^16 (0.07 at s=0.5, 0.52 at 0.7, 0.93 at 0.8, 1.00 at 0.9);
    verified pairs must have estimated Jaccard >= ``threshold``.

    Args:
        enabled: Run MinHash-LSH near-duplicate clustering.
        num_perm: Hash permutations per signature.
        bands: LSH bands.
        rows: Rows (signature values) per band.
        ngram: Word n-gram size for non-Chinese text.
        zh_ngram: Character n-gram size for Chinese text.
        threshold: Verification: minimum estimated Jaccard for a candidate pair to count as duplicate.
        verify: Verify candidate pairs (off = every bucket collision is a duplicate).
        seed: Seed of the hash permutations.
    """

    enabled: bool = True
    num_perm: int = 128
    bands: int = 16
    rows: int = 8
    ngram: int = 5
    zh_ngram: int = 5
    threshold: float = 0.7
    verify: bool = True
    seed: int = 1

    def __post_init__(self):
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows ({self.bands}x{self.rows}) exceeds num_perm ({self.num_perm})")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")

    def collision_probability(self, s: float) -> float:
        return 1.0 - (1.0 - s ** self.rows) ** self.bands


_TABLE: np.ndarray | None = None


def _char_table() -> np.ndarray:
    """Lower-case map over the BMP with punctuation, symbols and whitespace sent to 32 (space).

    Cleaning whole batches through one table lookup replaces a regex + lower() per document; characters
    beyond the BMP (emoji, rare CJK) pass through unchanged as word characters.
    """
    global _TABLE
    if _TABLE is None:
        import unicodedata

        table = np.arange(0x10000, dtype=np.uint64)
        for c in range(0x10000):
            ch = chr(c)
            if ch.isspace() or (unicodedata.category(ch)[0] in "PSZC" and ch != "_"):
                table[c] = 32
            else:
                low = ch.lower()
                if len(low) == 1:
                    table[c] = ord(low)
        _TABLE = table
    return _TABLE


def _clean(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Code points of all texts joined by spaces, cleaned -> (code points, start offset of each text)."""
    joined = " ".join(texts)
    cp = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    bmp = cp < 0x10000
    cp[bmp] = _char_table()[cp[bmp]]
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    return cp, starts


_POWER_CACHE: dict[int, np.ndarray] = {}


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base^0..base^(n-1) mod 2^64, cached and grown by doubling (batches reuse it)."""
    cached = _POWER_CACHE.get(int(base))
    if cached is None:
        block = np.full(1 << 12, base, dtype=np.uint64)
        block[0] = 1
        with np.errstate(over="ignore"):
            cached = np.multiply.accumulate(block)
    with np.errstate(over="ignore"):
        while len(cached) < n:  # doubling: [p^0..p^(k-1)] -> also [p^k..p^(2k-1)] = p^k * first half
            step = cached[-1] * base
            cached = np.concatenate([cached, cached * step])
    _POWER_CACHE[int(base)] = cached
    return cached[:n]


_INV_MIX = np.uint64(pow(int(_MIX), -1, 1 << 64))  # _MIX is odd, hence invertible modulo 2^64


def _unit_hashes(cp: np.ndarray, char_units: bool) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hash and start offset of every unit: maximal runs of non-space code points (words), or
    every single non-space code point when ``char_units`` (Chinese).

    A word's polynomial hash sum_i c_i * M^i (mod 2^64) is a difference of prefix sums rescaled by
    M^-start; M is odd, so the inverse exists and the whole batch costs a few numpy passes.
    """
    n = len(cp)
    word = cp != 32
    if char_units:
        starts = np.flatnonzero(word)
        ends = starts + 1
    else:
        edges = np.diff(np.concatenate([[False], word, [False]]).astype(np.int8))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if len(starts) == 0:
        return np.zeros(0, np.uint64), starts
    with np.errstate(over="ignore"):
        prefix = np.concatenate([[np.uint64(0)], np.cumsum((cp + np.uint64(1)) * _powers(_MIX, n), dtype=np.uint64)])
        h = (prefix[ends] - prefix[starts]) * _powers(_INV_MIX, n)[starts]
        h ^= (ends - starts).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)  # length salt
        h = (h ^ (h >> np.uint64(31))) * np.uint64(0x94D049BB133111EB)  # final avalanche
    return h, starts


def _ngrams(units: np.ndarray, doc_of: np.ndarray, n: int, ndocs: int) -> tuple[np.ndarray, np.ndarray]:
    """All n-gram hashes that stay inside one document -> (hashes, doc index), sorted by document.
    A document with fewer than n units contributes one gram of all its units."""
    counts = np.bincount(doc_of, minlength=ndocs)
    m = len(units) - n + 1
    if m > 0:
        grams = np.zeros(m, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(n):
                grams = grams * _MIX + units[j:j + m]
        inside = doc_of[:m] == doc_of[n - 1:]
        grams, gdoc = grams[inside], doc_of[:m][inside]
    else:
        grams, gdoc = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    short = np.flatnonzero((counts > 0) & (counts < n))
    if len(short):
        starts = np.concatenate([[0], np.cumsum(counts)])
        extra = np.zeros(len(short), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k, d in enumerate(short):
                for u in units[starts[d]:starts[d + 1]]:
                    extra[k] = extra[k] * _MIX + u
        grams, gdoc = np.concatenate([grams, extra]), np.concatenate([gdoc, short])
        order = np.argsort(gdoc, kind="stable")
        grams, gdoc = grams[order], gdoc[order]
    return grams, gdoc


def _group_shingles(texts: list[str], zh: bool, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of texts of one script group -> (hashes, local document index), by document."""
    cp, doc_starts = _clean(texts)
    units, unit_starts = _unit_hashes(cp, char_units=zh)
    local_doc = np.searchsorted(doc_starts, unit_starts, side="right") - 1
    return _ngrams(units, local_doc, n, len(texts))


def batch_shingles(texts: list[str], langs: list[str], params: MinHashParams) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of a whole batch -> (hashes, document index), grouped by document."""
    out_h, out_d = [], []
    for zh, n in ((True, params.zh_ngram), (False, params.ngram)):
        idx = np.array([i for i, lang in enumerate(langs) if (lang == "zh") == zh], dtype=np.int64)
        if len(idx):
            grams, gdoc = _group_shingles([texts[i] for i in idx], zh, n)
            out_h.append(grams)
            out_d.append(idx[gdoc])
    if not out_h:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    h, d = np.concatenate(out_h), np.concatenate(out_d)
    order = np.argsort(d, kind="stable")
    return h[order], d[order]


def shingles(text: str, params: MinHashParams, lang: str | None = None) -> np.ndarray:
    """Unique shingle hashes of one document (character n-grams for Chinese, word n-grams otherwise)."""
    lang = lang or detect_language(text)
    return np.unique(batch_shingles([text], ["zh" if lang == "zh" else "en"], params)[0])


class MinHasher:
    """Batch MinHash signatures, [docs, num_perm] uint32 (an all-0xFFFFFFFF row marks an empty document)."""

    def __init__(self, params: MinHashParams = MinHashParams(), chunk_shingles: int = 8192):
        self.params = params
        rng = np.random.default_rng(params.seed)
        self.a = (rng.integers(1, 1 << 63, size=params.num_perm, dtype=np.uint64) | np.uint64(1))[:, None]
        self.b = rng.integers(0, 1 << 63, size=params.num_perm, dtype=np.uint64)[:, None]
        # [perms, chunk] layout: reduceat along the contiguous axis is ~10x faster than along axis 0, and an
        # 8k-shingle chunk (8 MB) stays in cache.  Measured ~50k docs/s/core for 300-shingle documents.
        self.chunk = chunk_shingles

    def signatures(self, texts: list[str], langs: list[str] | None = None, batch_docs: int = 256) -> np.ndarray:
        """Signatures of ``texts``; Chinese and other documents are shingled in separate groups, and each
        group in batches of ``batch_docs`` so the working arrays stay cache-sized."""
        langs = langs or [detect_language(t) for t in texts]
        out = np.empty((len(texts), self.params.num_perm), dtype=np.uint32)
        for zh in (True, False):
            idx = np.array([i for i, lang in enumerate(langs) if (lang == "zh") == zh], dtype=np.int64)
            n = self.params.zh_ngram if zh else self.params.ngram
            for s in range(0, len(idx), batch_docs):
                part = idx[s:s + batch_docs]
                hashes, docs = _group_shingles([texts[i] for i in part], zh, n)
                out[part] = self.signatures_from_hashes(hashes, docs, len(part))
        return out

    def signatures_from_hashes(self, hashes: np.ndarray, docs: np.ndarray, num_docs: int) -> np.ndarray:
        """Signatures from shingle hashes grouped by document index (``docs`` non-decreasing)."""
        sig = np.full((self.params.num_perm, num_docs), np.iinfo(np.uint64).max, dtype=np.uint64)
        buf = np.empty((self.params.num_perm, self.chunk), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for s in range(0, len(hashes), self.chunk):
                x, d = hashes[s:s + self.chunk], docs[s:s + self.chunk]
                h = buf[:, :len(x)]
                np.multiply(self.a, x[None, :], out=h)
                h += self.b
                starts = np.flatnonzero(np.concatenate([[True], d[1:] != d[:-1]]))
                mins = np.minimum.reduceat(h, starts, axis=1)
                cols = d[starts]  # a document split over two chunks is merged by the minimum below
                sig[:, cols] = np.minimum(sig[:, cols], mins)
        # The top 32 bits of a*x+b are the multiply-shift hash; min commutes with the monotone shift.
        return (sig >> np.uint64(32)).T.astype(np.uint32)


def band_keys(sig: np.ndarray, params: MinHashParams) -> np.ndarray:
    """[docs, bands] uint64 bucket keys; empty documents get key 0 (never bucketed)."""
    sig64 = sig[:, : params.bands * params.rows].astype(np.uint64).reshape(len(sig), params.bands, params.rows)
    keys = np.zeros((len(sig), params.bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(params.rows):
            keys = keys * _MIX + sig64[:, :, j] + np.uint64(1)
        keys ^= np.arange(params.bands, dtype=np.uint64)[None, :] * np.uint64(0xD6E8FEB86659FD93)
    empty = (sig == 0xFFFFFFFF).all(axis=1)  # no shingles at all
    keys[empty] = 0
    return keys


def bucket_pairs(keys: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
    """Edges (anchor, member) for every bucket with more than one document, from one band's keys.

    Sorting (key, id) puts each bucket's members together; each member is paired with the bucket's
    smallest id (the anchor), which is all connected components need and keeps edges linear in docs.
    """
    ids = np.arange(len(keys), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    valid = keys != 0
    keys, ids = keys[valid], ids[valid]
    order = np.lexsort((ids, keys))
    keys, ids = keys[order], ids[order]
    if len(keys) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    new_bucket = np.concatenate([[True], keys[1:] != keys[:-1]])
    anchor_pos = np.maximum.accumulate(np.where(new_bucket, np.arange(len(keys)), 0))
    member = ~new_bucket
    return np.stack([ids[anchor_pos[member]], ids[member]], axis=1)


def estimated_jaccard(sig: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    if len(pairs) == 0:
        return np.zeros(0)
    return (sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1)


def verify_pairs(sig: np.ndarray, pairs: np.ndarray, params: MinHashParams) -> np.ndarray:
    if not params.verify or len(pairs) == 0:
        return pairs
    return pairs[estimated_jaccard(sig, pairs) >= params.threshold]


def connected_components(num_docs: int, pairs: np.ndarray) -> np.ndarray:
    """Cluster label per document = the smallest document index in its component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as cc

    if len(pairs) == 0:
        return np.arange(num_docs, dtype=np.int64)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(num_docs, num_docs))
    _, labels = cc(graph, directed=False)
    # Canonical label: the first document of the component, so results don't depend on scipy's numbering.
    first = np.full(labels.max() + 1, num_docs, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(num_docs))
    return first[labels]


def cluster(sig: np.ndarray, params: MinHashParams) -> tuple[np.ndarray, np.ndarray]:
    """In-memory LSH clustering of one signature matrix -> (cluster label per doc, verified edges)."""
    keys = band_keys(sig, params)
    pairs = [bucket_pairs(keys[:, b]) for b in range(params.bands)]
    edges = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), np.int64)
    edges = verify_pairs(sig, edges, params)
    return connected_components(len(sig), edges), edges
