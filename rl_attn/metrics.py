"""COCO caption metrics: BLEU-1..4, ROUGE-L, CIDEr and METEOR as pycocoevalcap 1.2 computes them.

Published captioning numbers come from the COCO caption evaluation toolkit (``pycocoevalcap``),
whose definitions differ from the textbook ones in small but visible ways, so BLEU, ROUGE-L and
CIDEr are reimplemented here rule for rule and checked against the toolkit in
``tests/test_metrics.py``.
METEOR is the toolkit's Java jar itself, used when Java and ``pycocoevalcap`` are installed.

Scorers take ``refs: {image_id: [reference, ...]}`` and ``hyps: {image_id: hypothesis}`` with the
same ids. :func:`bleu`, :func:`rouge_l`, :func:`cider` and :func:`meteor` expect captions already
tokenised (tokens joined by single spaces); :func:`caption_metrics` tokenises raw captions first,
as the toolkit's ``COCOEvalCap`` does, then runs them all.
"""

from __future__ import annotations

import atexit
import importlib.util
import math
import re
import shutil
import subprocess
import threading
import warnings
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

Refs = Mapping[Hashable, Sequence[str]]
Hyps = Mapping[Hashable, str]

# The toolkit's PTB tokenizer turns brackets into escapes and lower-cases them; its punctuation
# filter lists the upper-case escapes only, so these survive as words and must survive here too.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# The tokens the toolkit deletes after tokenising (double quotes become `` and '' in PTB).
_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_TOKEN = re.compile(
    r"\w+(?=n't\b)|n't\b"  # PTB splits "don't" into "do n't"
    r"|(?<=\w)'\w+"  # ... and "dog's" into "dog 's"
    r"|\w+(?:[-.]\w+)*"  # words keep inner hyphens and decimal points: "t-shirt", "3.5"
    r"|\.\.\.|--|\S"
)

# BLEU smoothing of the toolkit: a zero match count gives a tiny precision rather than log(0), and
# an empty denominator does not divide by zero. Both nudge even a perfect score just below 1.
_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9
# The toolkit's F-measure beta (the ROUGE authors' advice to it): recall outweighs precision.
_ROUGE_BETA = 1.2
_CIDER_N = 4
_CIDER_SIGMA = 6.0

_METEOR_JAR = Path("meteor") / "meteor-1.5.jar"


def tokenize(text: str) -> list[str]:
    """Lower-cased tokens of a caption, with the punctuation the toolkit removes removed.

    A pure-Python stand-in for the toolkit's Java PTB tokenizer (which is not used) followed by its
    punctuation filter. Punctuation is split off words and ``. , ; : ! ? ' " - -- ...`` are
    dropped, so our captions ``"a red circle , a blue square"`` score as
    ``["a", "red", "circle", "a", "blue", "square"]``; clitics split as in PTB (``dog 's``,
    ``do n't``) and brackets become ``-lrb-`` etc., which the toolkit keeps. On plain English
    captions this equals the toolkit's tokenisation; exotic PTB rules (abbreviations such as
    ``u.s.``, currency, URLs) are not reproduced.
    """
    tokens = (_BRACKETS.get(t, t) for t in _TOKEN.findall(text.lower()))
    return [t for t in tokens if t not in _PUNCTUATION]


def bleu(refs: Refs, hyps: Hyps, n: int = 4) -> list[float]:
    """Corpus BLEU-1..n in [0, 1], as the toolkit's ``Bleu`` scorer computes it.

    Counts are pooled over the corpus before dividing: hypothesis n-gram counts are clipped by
    their largest count in any one reference of the image, and the brevity penalty compares the
    total hypothesis length with the total of each image's "closest" reference length (the one
    nearest the hypothesis length, the shorter on a tie). BLEU-k is the geometric mean of the 1..k
    precisions. The toolkit's smoothing applies, so an order with no match scores a tiny positive
    number rather than 0, and a perfect corpus scores ``1 - O(1e-9)`` rather than exactly 1.
    """
    if n < 1:
        raise ValueError(f"BLEU needs n >= 1, got {n}")
    ids = _checked_ids(refs, hyps)
    matches = [0] * n
    guesses = [0] * n
    hyp_len = ref_len = 0
    for i in ids:
        words = hyps[i].split()
        ref_words = [r.split() for r in refs[i]]
        hyp_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        clip = Counter()
        for r in ref_words:
            clip |= _ngram_counts(r, n)
        for gram, count in _ngram_counts(words, n).items():
            matches[len(gram) - 1] += min(count, clip[gram])
        for k in range(n):
            guesses[k] += max(0, len(words) - k)

    scores = []
    precision_product = 1.0
    for k in range(n):
        precision_product *= (matches[k] + _BLEU_TINY) / (guesses[k] + _BLEU_SMALL)
        scores.append(precision_product ** (1.0 / (k + 1)))
    # Smoothed, the ratio is below 1 even when the lengths are equal, so the penalty always applies.
    ratio = (hyp_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def rouge_l(refs: Refs, hyps: Hyps) -> float:
    """Mean over images of the toolkit's ROUGE-L F-score, in [0, 1].

    Per image, precision and recall are each the best over the references of LCS / hypothesis
    length and LCS / reference length (possibly from different references), combined as
    ``(1 + b^2) P R / (R + b^2 P)`` with ``b = 1.2``. An empty hypothesis scores 0.
    """
    ids = _checked_ids(refs, hyps)
    scores = []
    for i in ids:
        hyp = hyps[i].split()
        precision = recall = 0.0
        for ref in (r.split() for r in refs[i]):
            if hyp and ref:
                lcs = _lcs_length(ref, hyp)
                precision = max(precision, lcs / len(hyp))
                recall = max(recall, lcs / len(ref))
        if precision and recall:
            b2 = _ROUGE_BETA**2
            scores.append((1 + b2) * precision * recall / (recall + b2 * precision))
        else:
            scores.append(0.0)
    return sum(scores) / len(scores)


def cider(refs: Refs, hyps: Hyps) -> float:
    """The toolkit's CIDEr (which is CIDEr-D), >= 0 and 10 for a caption equal to all its refs.

    Each caption becomes, per n-gram order 1..4, a vector of raw n-gram counts times the IDF
    ``log(#images) - log(max(1, document frequency))``, where the document frequency counts images
    whose references contain the n-gram: the IDF comes from the references being evaluated, so a
    single image scores 0 and the score depends on the whole set. Per order, the similarity to a
    reference is the cosine with the hypothesis weights clipped at the reference's, times a
    Gaussian length penalty ``exp(-delta^2 / (2 * 6^2))``; it is averaged over orders and
    references, times 10, and then over images.
    """
    ids = _checked_ids(refs, hyps)
    ref_counts = {i: [_ngram_counts(r.split(), _CIDER_N) for r in refs[i]] for i in ids}
    doc_freq = Counter(gram for i in ids for gram in set().union(*ref_counts[i]))
    log_images = math.log(len(ids))

    def tfidf(words: list[str]) -> tuple[dict[tuple[str, ...], float], list[float], int]:
        weights = {}
        squares = [0.0] * _CIDER_N
        for gram, count in _ngram_counts(words, _CIDER_N).items():
            weights[gram] = count * (log_images - math.log(max(1.0, doc_freq[gram])))
            squares[len(gram) - 1] += weights[gram] ** 2
        # The toolkit measures length in bigrams; that only matters when a caption is empty.
        return weights, [math.sqrt(s) for s in squares], max(0, len(words) - 1)

    scores = []
    for i in ids:
        hyp, hyp_norms, hyp_len = tfidf(hyps[i].split())
        per_order = [0.0] * _CIDER_N
        for ref_words in (r.split() for r in refs[i]):
            ref, ref_norms, ref_len = tfidf(ref_words)
            overlap = [0.0] * _CIDER_N
            for gram, weight in hyp.items():
                # Clipping stops a hypothesis from earning credit by repeating a rare n-gram.
                overlap[len(gram) - 1] += min(weight, ref.get(gram, 0.0)) * ref.get(gram, 0.0)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * _CIDER_SIGMA**2))
            for k in range(_CIDER_N):
                if hyp_norms[k] and ref_norms[k]:
                    overlap[k] /= hyp_norms[k] * ref_norms[k]
                per_order[k] += overlap[k] * penalty
        scores.append(sum(per_order) / _CIDER_N / len(refs[i]) * 10.0)
    return sum(scores) / len(scores)


def meteor(refs: Refs, hyps: Hyps) -> float | None:
    """METEOR 1.5 in [0, 1] from the toolkit's own jar, or None when it cannot be run.

    Needs ``java`` on PATH and the ``pycocoevalcap`` package (for ``meteor-1.5.jar``); without
    either this returns None. The jar runs as the toolkit runs it (``-l en -norm``, scores pooled
    over the corpus) in one process kept for later calls, since loading its paraphrase table
    takes about ten seconds. Should the jar fail, this warns and returns None rather than raise.
    """
    ids = _checked_ids(refs, hyps)
    java = shutil.which("java")
    jar = _toolkit_meteor_jar()
    if java is None or jar is None:
        return None
    pairs = [([_meteor_field(r) for r in refs[i]], _meteor_field(hyps[i])) for i in ids]
    try:
        return _meteor_process(java, jar).score(pairs)
    except (OSError, ValueError) as err:
        _close_meteor_process(java, jar)
        warnings.warn(f"METEOR left out: the toolkit's jar failed ({err})", stacklevel=2)
        return None


def caption_metrics(refs: Refs, hyps: Hyps, *, with_meteor: bool = True) -> dict[str, float]:
    """Tokenise raw captions with :func:`tokenize`, then score them as ``COCOEvalCap`` does.

    Returns ``BLEU-1`` .. ``BLEU-4``, ``ROUGE-L``, ``CIDEr`` and, where :func:`meteor` can run and
    ``with_meteor`` is set, ``METEOR`` (its jar takes about 10 s to start once per process).
    Raises ValueError when ``refs`` and ``hyps`` cover different image ids, or an image has no
    references.
    """
    _checked_ids(refs, hyps)
    tok_refs = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in refs.items()}
    tok_hyps = {i: " ".join(tokenize(h)) for i, h in hyps.items()}
    result = {f"BLEU-{k}": s for k, s in enumerate(bleu(tok_refs, tok_hyps), start=1)}
    result["ROUGE-L"] = rouge_l(tok_refs, tok_hyps)
    result["CIDEr"] = cider(tok_refs, tok_hyps)
    score = meteor(tok_refs, tok_hyps) if with_meteor else None
    if score is not None:
        result["METEOR"] = score
    return result


def _checked_ids(refs: Refs, hyps: Hyps) -> list[Hashable]:
    """The image ids in ``refs`` order, after the checks the toolkit leaves to bare asserts."""
    no_hyp = [i for i in refs if i not in hyps]
    no_refs = [i for i in hyps if i not in refs]
    if no_hyp or no_refs:
        raise ValueError(
            "refs and hyps must have the same image ids: "
            f"{len(no_hyp)} id(s) have references but no hypothesis {no_hyp[:5]}, "
            f"{len(no_refs)} have a hypothesis but no references {no_refs[:5]}"
        )
    if not refs:
        raise ValueError("no images to score: refs and hyps are empty")
    for i, rs in refs.items():
        if isinstance(rs, str):
            raise TypeError(f"references of image {i!r} must be a list of strings, not one string")
        if len(rs) == 0:
            raise ValueError(f"image {i!r} has no reference captions")
        if not isinstance(hyps[i], str):
            raise TypeError(f"hypothesis of image {i!r} must be one string, got {type(hyps[i])}")
    return list(refs)


def _ngram_counts(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    """Counts of every 1..n-gram of ``words``, keyed by word tuples."""
    return Counter(
        tuple(words[start : start + k])
        for k in range(1, n + 1)
        for start in range(len(words) - k + 1)
    )


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _toolkit_meteor_jar() -> Path | None:
    """``meteor-1.5.jar`` inside the installed pycocoevalcap, found without importing it."""
    try:
        spec = importlib.util.find_spec("pycocoevalcap")
    except (ImportError, ValueError):
        return None
    folders = spec.submodule_search_locations if spec is not None else None
    for folder in folders or []:
        jar = Path(folder) / _METEOR_JAR
        if jar.is_file():
            return jar
    return None


def _meteor_field(caption: str) -> str:
    """A caption made safe for the jar's ``|||``-separated line protocol (the toolkit does this to
    hypotheses only; for single-space-joined tokens without ``|||`` it changes nothing)."""
    return " ".join(caption.replace("|||", "").split())


class _MeteorProcess:
    """The METEOR jar in ``-stdio`` mode, speaking the protocol of the toolkit's ``Meteor``."""

    def __init__(self, java: str, jar: Path):
        self._proc = subprocess.Popen(
            [java, "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=jar.parent,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._lock = threading.Lock()

    def alive(self) -> bool:
        return self._proc.poll() is None

    def score(self, pairs: list[tuple[list[str], str]]) -> float:
        """Corpus METEOR of ``(references, hypothesis)`` pairs."""
        with self._lock:
            stats = []
            for refs, hyp in pairs:
                self._send(" ||| ".join(["SCORE", *refs, hyp]))
                stats.append(self._receive())
            # The jar answers EVAL with one score per caption, then the corpus score.
            self._send(" ||| ".join(["EVAL", *stats]))
            for _ in pairs:
                self._receive()
            return float(self._receive())

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout):
            pipe.close()

    def _send(self, line: str) -> None:
        self._proc.stdin.write(f"{line}\n".encode())
        self._proc.stdin.flush()

    def _receive(self) -> str:
        line = self._proc.stdout.readline().decode().strip()
        if not line:
            raise OSError(f"the METEOR jar stopped answering (exit code {self._proc.poll()})")
        return line


_meteor_processes: dict[tuple[str, Path], _MeteorProcess] = {}


def _meteor_process(java: str, jar: Path) -> _MeteorProcess:
    process = _meteor_processes.get((java, jar))
    if process is None or not process.alive():
        process = _meteor_processes[(java, jar)] = _MeteorProcess(java, jar)
    return process


def _close_meteor_process(java: str, jar: Path) -> None:
    process = _meteor_processes.pop((java, jar), None)
    if process is not None:
        process.close()


@atexit.register
def _close_all_meteor_processes() -> None:
    for java, jar in list(_meteor_processes):
        _close_meteor_process(java, jar)
