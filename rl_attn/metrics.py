"""COCO caption metrics: BLEU-1..4, ROUGE-L, CIDEr and METEOR from pycocoevalcap 1.2 itself.

Published captioning numbers are by definition those of the COCO caption evaluation toolkit
(``pycocoevalcap``), so BLEU, ROUGE-L and CIDEr are its own pure-Python ``Bleu``, ``Rouge`` and
``Cider`` scorers, called as its ``COCOEvalCap`` calls them. The two steps of ``COCOEvalCap`` that
need Java are done here instead:

- Tokenising. The toolkit's ``PTBTokenizer`` writes the captions to a temporary file and runs the
  Stanford CoreNLP jar on it in a new Java process at every call, so evaluation would need Java and
  a JVM start. :func:`tokenize` is a Python port of what it does to English captions, checked
  against it in ``tests/test_metrics.py`` where Java is present.
- METEOR. :func:`meteor` runs the toolkit's own jar when ``java`` is on PATH, in one process kept
  for later calls (loading its paraphrase table takes about ten seconds).

Two inputs the bare scorers mishandle keep the answer they had before the toolkit scored here: an
empty hypothesis scores ROUGE-L 0 (the toolkit's ``Rouge`` splits it into one empty token, which
matches an empty reference for a perfect score), and a set whose references are all empty scores
CIDEr 0 (the toolkit's ``Cider`` fails with a bare ``max()`` error).

Scorers take ``refs: {image_id: [reference, ...]}`` and ``hyps: {image_id: hypothesis}`` with the
same ids. :func:`caption_metrics` takes raw captions; :func:`meteor` takes captions already
tokenised (tokens joined by single spaces).
"""

from __future__ import annotations

import atexit
import re
import shutil
import subprocess
import threading
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _toolkit_meteor
from pycocoevalcap.rouge.rouge import Rouge

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

# The toolkit's wrapper expects its jar beside its own module.
_METEOR_JAR = Path(_toolkit_meteor.__file__).with_name("meteor-1.5.jar")


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


def meteor(refs: Refs, hyps: Hyps) -> float | None:
    """METEOR 1.5 in [0, 1] from the toolkit's own jar, or None when it cannot be run.

    Needs ``java`` on PATH and the ``meteor-1.5.jar`` that the ``pycocoevalcap`` package ships;
    without either this returns None. The jar runs as the toolkit runs it (``-l en -norm``,
    scores pooled over the corpus) in one process kept for later calls, since loading its
    paraphrase table takes about ten seconds. Should the jar fail, this warns and returns None
    rather than raise.
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

    Returns ``BLEU-1`` .. ``BLEU-4`` (corpus BLEU, the toolkit's "closest" reference length and
    smoothing), ``ROUGE-L`` (mean over images), ``CIDEr`` (the toolkit's CIDEr-D, IDF from the
    references being scored, so one image alone scores 0) and, where :func:`meteor` can run and
    ``with_meteor`` is set, ``METEOR`` (its jar takes about 10 s to start once per process). All
    are floats in [0, 1] except CIDEr, >= 0 and 10 for a caption equal to all its references.
    Nothing is printed. Raises ValueError when ``refs`` and ``hyps`` cover different image ids,
    or an image has no references.
    """
    ids = _checked_ids(refs, hyps)
    gts = {i: [" ".join(tokenize(r)) for r in refs[i]] for i in ids}
    res = {i: [" ".join(tokenize(hyps[i]))] for i in ids}
    # verbose=0: by default the toolkit's Bleu prints its n-gram totals to stdout at every call.
    bleus, _ = Bleu(4).compute_score(gts, res, verbose=0)
    result = {f"BLEU-{k}": float(s) for k, s in enumerate(bleus, start=1)}
    result["ROUGE-L"] = _rouge_l(gts, res)
    result["CIDEr"] = _cider(gts, res)
    score = meteor(gts, {i: hyp for i, (hyp,) in res.items()}) if with_meteor else None
    if score is not None:
        result["METEOR"] = score
    return result


def _rouge_l(gts: dict[Hashable, list[str]], res: dict[Hashable, list[str]]) -> float:
    """The toolkit's mean ROUGE-L, with an empty hypothesis scoring 0 whatever its references."""
    _, per_image = Rouge().compute_score(gts, res)
    per_image = np.where([hyp == [""] for hyp in res.values()], 0.0, per_image)
    return float(np.mean(per_image))


def _cider(gts: dict[Hashable, list[str]], res: dict[Hashable, list[str]]) -> float:
    """The toolkit's CIDEr, or 0 when no reference holds a word (nothing can match then)."""
    if not any(ref for refs in gts.values() for ref in refs):
        return 0.0
    return float(Cider().compute_score(gts, res)[0])


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


def _toolkit_meteor_jar() -> Path | None:
    """The toolkit's ``meteor-1.5.jar``, or None where an install left it out."""
    return _METEOR_JAR if _METEOR_JAR.is_file() else None


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
