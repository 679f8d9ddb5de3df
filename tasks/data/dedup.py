"""Exact and near-duplicate detection on normalised text.

Exact: SHA-1 of the lower-cased, punctuation-free, whitespace-collapsed text.
Near: MinHash signatures of character shingles (datasketch) in an LSH index tuned *below* the
configured threshold, so it over-proposes candidates; each candidate is then confirmed with the
exact Jaccard similarity of the shingle sets. That keeps the decision exact and deterministic while
LSH keeps it sub-quadratic.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from configs.data_schema import DedupConfig

_NON_ALNUM = re.compile(r"[\W_]+")
# MinHash permutations are seeded so that signatures (and thus candidates) are reproducible.
_MINHASH_SEED = 1


def normalize(text: str) -> str:
    """Lower-case, NFKC, punctuation to spaces, whitespace collapsed."""
    return _NON_ALNUM.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def exact_key(text: str) -> str:
    """Hash identifying texts that are equal after :func:`normalize`."""
    return hashlib.sha1(normalize(text).encode()).hexdigest()


def shingles(text: str, size: int) -> set[str]:
    """Character ``size``-grams of the normalised text (the whole text when shorter)."""
    norm = normalize(text)
    if len(norm) <= size:
        return {norm}
    return {norm[i : i + size] for i in range(len(norm) - size + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    """Jaccard similarity of two sets (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class NearDupIndex:
    """Kept texts, queryable for near duplicates of a new text.

    Args:
        cfg: threshold, shingle size and MinHash permutations.
    """

    def __init__(self, cfg: DedupConfig):
        from datasketch import MinHashLSH

        self.cfg = cfg
        # LSH recall drops near its threshold; asking for 0.2 less and verifying exactly means a pair
        # at the real threshold is almost never missed.
        self._lsh = MinHashLSH(threshold=max(0.05, cfg.threshold - 0.2), num_perm=cfg.num_perm)
        self._sets: dict[str, set[str]] = {}
        self._permutations = None

    def _minhash(self, grams: set[str]):
        from datasketch import MinHash

        if self._permutations is None:  # drawing permutations is the costly part; do it once
            first = MinHash(num_perm=self.cfg.num_perm, seed=_MINHASH_SEED)
            self._permutations, self._scheme = first.permutations, first.scheme
        signature = MinHash(num_perm=self.cfg.num_perm, seed=_MINHASH_SEED, permutations=self._permutations,
                            scheme=self._scheme)
        signature.update_batch([g.encode() for g in sorted(grams)])
        return signature

    def prepare(self, text: str):
        """Shingles and signature of ``text`` (pass the result to :meth:`query` and :meth:`add`)."""
        grams = shingles(text, self.cfg.shingle_size)
        return grams, self._minhash(grams)

    def query(self, prepared) -> list[tuple[str, float]]:
        """Keys of kept texts whose Jaccard similarity with the prepared text reaches the threshold."""
        grams, signature = prepared
        hits = []
        for key in self._lsh.query(signature):
            score = jaccard(grams, self._sets[key])
            if score >= self.cfg.threshold:
                hits.append((key, score))
        return sorted(hits, key=lambda hit: (-hit[1], hit[0]))

    def add(self, key: str, prepared) -> None:
        """Keep a text under ``key`` (unique)."""
        grams, signature = prepared
        self._lsh.insert(key, signature)
        self._sets[key] = grams

    def __len__(self) -> int:
        return len(self._sets)
