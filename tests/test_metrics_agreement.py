"""``capsfus eval``'s BLEU and ROUGE-L are the numbers the field reports: on the same inputs
they equal sacrebleu's (corpus BLEU without smoothing; sentence BLEU with add-1 smoothing of
the 2- to 4-gram precisions, sacrebleu's ``add-k``) and Google's ``rouge-score`` (ROUGE-L F1,
no stemmer). "The same inputs": ours compare lowercased runs of letters and digits, so
sacrebleu gets those tokens joined by spaces (``tokenize='none'``); rouge-score tokenizes
itself (lowercase, split on anything not a-z0-9), which is the same on ASCII text (on
non-ASCII letters ours keep "café" whole where rouge-score drops the "é").

CIDEr-D equals the COCO caption evaluation's (``pycocoevalcap``'s ``Cider``, pure Python) fed
the same tokens joined by spaces: its PTBTokenizer needs Java and is not used."""

from __future__ import annotations

import random

import pytest
from conftest import caption_corpus

from capsfus.quality import metrics as M

# installed by the `test` extra (install.sh): a missing one is an install error, not a skip
import pycocoevalcap.cider.cider as coco_cider  # noqa: E402
import rouge_score.rouge_scorer as rouge_scorer  # noqa: E402
import sacrebleu  # noqa: E402


def pairs(n: int = 400, seed: int = 3) -> list[tuple[str, str]]:
    """Caption-like candidate/reference pairs: shuffled, cut, repeated and swapped words,
    punctuation and case, empty and one-word sides, exact copies."""
    rng = random.Random(seed)
    lines = caption_corpus()
    out = [("", "a red car"), ("a red car", ""), ("car", "a red car"), ("a red car", "a red car"),
           ("Red, red CAR!", "a red car.")]
    while len(out) < n:
        ref = rng.choice(lines)
        words = ref.split() + rng.choice(lines).split()[:rng.randint(0, 4)]
        k = rng.random()
        if k < 0.3:
            rng.shuffle(words)
        elif k < 0.5:
            words = words[:rng.randint(1, len(words))]
        elif k < 0.6:
            words = words + words[:3]
        cand = " ".join(w.upper() if rng.random() < 0.1 else w for w in words)
        out.append((cand + rng.choice(["", ".", "!", " ,"]), ref))
    return out


def test_rouge_l_equals_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for cand, ref in pairs():
        theirs = scorer.score(ref, cand)["rougeL"]          # (target, prediction)
        ours = M.rouge_l(cand, ref)
        assert (ours["p"], ours["r"], ours["f"]) == pytest.approx(
            (theirs.precision, theirs.recall, theirs.fmeasure), abs=1e-12), (cand, ref)


def _joined(text: str) -> str:
    return " ".join(M.tokens(text))


def test_sentence_bleu_equals_sacrebleu_add_k():
    bleu = sacrebleu.BLEU(tokenize="none", smooth_method="add-k", lowercase=False,
                          effective_order=False)
    for cand, ref in pairs():
        theirs = bleu.sentence_score(_joined(cand), [_joined(ref)]).score / 100
        assert M.sentence_bleu(cand, ref) == pytest.approx(theirs, abs=1e-9), (cand, ref)


def test_corpus_bleu_equals_sacrebleu():
    data = pairs()
    ours = M.CorpusBleu()
    for cand, ref in data:
        ours.add(cand, ref)
    theirs = sacrebleu.corpus_bleu([_joined(c) for c, _ in data], [[_joined(r) for _, r in data]],
                                   tokenize="none", smooth_method="none", lowercase=False)
    assert 0.05 < ours.score() < 0.95
    assert ours.score() == pytest.approx(theirs.score / 100, abs=1e-9)
    # a subset with a brevity penalty (candidates cut short) agrees too
    short = [(" ".join(c.split()[:3]), r) for c, r in data[:100]]
    ours = M.CorpusBleu()
    for cand, ref in short:
        ours.add(cand, ref)
    theirs = sacrebleu.corpus_bleu([_joined(c) for c, _ in short],
                                   [[_joined(r) for _, r in short]], tokenize="none",
                                   smooth_method="none", lowercase=False)
    assert theirs.bp < 1
    assert ours.score() == pytest.approx(theirs.score / 100, abs=1e-9)


def _coco_cider(rows: list[tuple[str, list[str]]]) -> tuple[float, list[float]]:
    gts = {i: [_joined(r) for r in refs] for i, (_, refs) in enumerate(rows)}
    res = {i: [_joined(c)] for i, (c, _) in enumerate(rows)}
    score, scores = coco_cider.Cider().compute_score(gts, res)
    return float(score), [float(x) for x in scores]


def test_cider_d_equals_pycocoevalcap():
    data = pairs()
    ours = M.CorpusCider()
    for cand, ref in data:
        ours.add(cand, ref)
    theirs, theirs_rows = _coco_cider([(c, [r]) for c, r in data])
    assert 0.3 < ours.score() < 9                    # neither degenerate nor all copies
    assert ours.score() == pytest.approx(theirs, abs=1e-9)
    assert ours.scores() == pytest.approx(theirs_rows, abs=1e-9)
    assert len({round(x, 6) for x in theirs_rows}) > 100  # varied rows, not a few repeated values
    # several references per row (as COCO has), of different counts, and a small corpus
    rng = random.Random(5)
    multi = [(c, [r] + [rng.choice(data)[1] for _ in range(rng.randint(0, 4))])
             for c, r in data[:150]]
    ours = M.CorpusCider()
    for cand, refs in multi:
        ours.add(cand, refs)
    theirs, theirs_rows = _coco_cider(multi)
    assert ours.score() == pytest.approx(theirs, abs=1e-9)
    assert ours.scores() == pytest.approx(theirs_rows, abs=1e-9)
