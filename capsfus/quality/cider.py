"""CIDEr-D as the COCO caption evaluation reports it ("CIDEr" in ``pycocoevalcap``).

Vedantam, Zitnick & Parikh 2015, in the form of ``pycocoevalcap/cider/cider_scorer.py`` (the
COCO toolkit's CIDEr-D), ported line for line so that, on the same tokens, the numbers are the
same (``tests/test_metrics_agreement.py`` compares the two on a few hundred pairs):

- per row, n-gram counts for n = 1..4 of the candidate and of each reference;
- document frequency df(g): the number of rows whose references hold the n-gram g (the
  references only, the candidates never count); weight of g in a vector: its count times
  ``log(rows) - log(max(1, df(g)))``;
- per n-gram order, the cosine of candidate and reference vectors with the candidate's weights
  clipped by the reference's (``min(w_c, w_r) * w_r``), times the Gaussian length penalty
  ``exp(-delta^2 / (2 sigma^2))``, sigma = 6;
- a row's score: the mean over the four orders, averaged over its references, times 10; the
  corpus score: the mean over rows.

As in the reference code, ``delta`` is the difference in *bigram* counts (the scorer counts
"length" on its n = 2 vectors): the difference in words whenever both sides have a word, and
when one side has none the row scores 0 anyway. Tokens are ours (``metrics.tokens``: lowercased runs of letters and digits); the COCO
toolkit's PTBTokenizer (Java) is not used.

The figure depends on the whole reference set (document frequencies), so it is a corpus
figure. COCO scores each image against 5 human references; ``capsfus eval`` has one reference
per row, so its absolute values are not comparable to published COCO CIDEr figures, only
between systems scored on the same rows.
"""

from __future__ import annotations

import math
from collections import Counter


def ngram_counts(words: list[str], n: int = 4) -> Counter:
    """Counts of every 1- to n-gram (tuples) of ``words``."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


class CorpusCider:
    """Add (candidate tokens, [reference tokens, ...]) per row; ``scores``/``score`` at the end."""

    def __init__(self, n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        self.tests: list[Counter] = []
        self.refs: list[list[Counter]] = []

    def add(self, candidate: list[str], references: list[list[str]]) -> None:
        if not references:
            raise ValueError("CIDEr needs at least one reference per row")
        self.tests.append(ngram_counts(candidate, self.n))
        self.refs.append([ngram_counts(r, self.n) for r in references])

    def __len__(self) -> int:
        return len(self.tests)

    def _vector(self, counts: Counter, df: Counter, log_rows: float):
        vec: list[dict] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            w = float(tf) * (log_rows - math.log(max(1.0, df[gram])))
            vec[k][gram] = w
            norm[k] += w * w
            if k == 1:                     # the reference scorer's "length": bigram count
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _sim(self, hyp, ref) -> list[float]:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        penalty = math.exp(-(float(lh - lr) ** 2) / (2 * self.sigma ** 2))
        out = []
        for k in range(self.n):
            val = 0.0
            for gram, w in vh[k].items():
                wr = vr[k].get(gram, 0.0)
                val += min(w, wr) * wr
            if nh[k] != 0 and nr[k] != 0:
                val /= nh[k] * nr[k]
            out.append(val * penalty)
        return out

    def scores(self) -> list[float]:
        """Per-row CIDEr-D (each depends on the whole corpus through df)."""
        if not self.tests:
            return []
        df: Counter = Counter()
        for refs in self.refs:
            df.update({g for r in refs for g in r})
        log_rows = math.log(float(len(self.refs)))
        out = []
        for test, refs in zip(self.tests, self.refs):
            hyp = self._vector(test, df, log_rows)
            total = [0.0] * self.n
            for r in refs:
                for k, v in enumerate(self._sim(hyp, self._vector(r, df, log_rows))):
                    total[k] += v
            out.append(sum(total) / self.n / len(refs) * 10.0)
        return out

    def score(self) -> float | None:
        """Corpus CIDEr-D: the mean over rows; None with no row."""
        s = self.scores()
        return sum(s) / len(s) if s else None
