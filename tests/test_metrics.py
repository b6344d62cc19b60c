import importlib.util
import random
import shutil
import sys

import pytest

from rl_attn.metrics import bleu, caption_metrics, cider, meteor, rouge_l, tokenize

# Tokenised captions in the style of our scenes, one case per rule worth checking.
REFS = {
    "perfect": [
        "a small red circle and a large blue square",
        "a red circle and a blue square",
        "a circle left of a square",
    ],
    "shorter": [
        "a medium green triangle and a small yellow cross",
        "a green triangle next to a yellow cross",
    ],
    "longer": ["a large purple diamond", "a purple diamond"],
    "no_overlap": ["a small red circle", "a red circle on grey"],
    "clipped": ["a blue square and a blue circle", "a blue square beside a red circle"],
    # Hypothesis length 5 is as close to 4 as to 6: BLEU takes the shorter reference.
    "length_tie": ["a small yellow cross", "a small yellow cross on grey"],
    "one_word": ["a large green circle"],
    7: ["a medium red square a small blue circle and a large green cross"],
}
HYPS = {
    "perfect": "a small red circle and a large blue square",
    "shorter": "a green triangle",
    "longer": "a large purple diamond and a large purple diamond and a small red circle",
    "no_overlap": "two tall orange stars",
    "clipped": "blue blue blue blue square square",
    "length_tie": "a yellow cross on grey",
    "one_word": "circle",
    7: "a medium red square a small blue circle and a large green cross",
}


def random_corpus(seed: int, images: int = 30) -> tuple[dict, dict]:
    """Captions over a small vocabulary, hypotheses edited from a reference so n-grams overlap."""
    rng = random.Random(seed)
    words = "a the small large red blue green circle square cross and of left".split()
    refs, hyps = {}, {}
    for i in range(images):
        refs[i] = [
            " ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 5))
        ]
        hyp = rng.choice(refs[i]).split()
        for _ in range(rng.randint(0, 4)):
            edit = rng.choice(["drop", "swap", "repeat"])
            if edit == "drop" and hyp:
                hyp.pop(rng.randrange(len(hyp)))
            elif edit == "swap" and hyp:
                hyp[rng.randrange(len(hyp))] = rng.choice(words)
            elif edit == "repeat" and hyp:
                hyp.extend(hyp[-2:])
        hyps[i] = " ".join(hyp)
    return refs, hyps


def toolkit_scores(refs: dict, hyps: dict) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: list(rs) for i, rs in refs.items()}
    res = {i: [h] for i, h in hyps.items()}
    bleus, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{k}": s for k, s in enumerate(bleus, start=1)}
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def java_and_toolkit() -> bool:
    return (
        shutil.which("java") is not None and importlib.util.find_spec("pycocoevalcap") is not None
    )


needs_java = pytest.mark.skipif(not java_and_toolkit(), reason="needs java and pycocoevalcap")


def close(expected: float):
    return pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("corpus", ["fixture", 0, 1, 2])
def test_bleu_rouge_cider_equal_the_toolkit(corpus):
    pytest.importorskip("pycocoevalcap")
    refs, hyps = (REFS, HYPS) if corpus == "fixture" else random_corpus(corpus)
    expected = toolkit_scores(refs, hyps)
    ours = bleu(refs, hyps)
    for k in range(4):
        assert ours[k] == close(expected[f"BLEU-{k + 1}"]), f"BLEU-{k + 1}"
    assert rouge_l(refs, hyps) == close(expected["ROUGE-L"])
    assert cider(refs, hyps) == close(expected["CIDEr"])
    assert bleu(refs, hyps, n=2) == ours[:2]


@pytest.mark.parametrize("case", list(REFS))
def test_each_fixture_case_alone_equals_the_toolkit(case):
    # One image at a time shows which rule broke; a single image also pins CIDEr at 0.
    pytest.importorskip("pycocoevalcap")
    refs, hyps = {case: REFS[case]}, {case: HYPS[case]}
    expected = toolkit_scores(refs, hyps)
    assert bleu(refs, hyps) == [close(expected[f"BLEU-{k}"]) for k in range(1, 5)]
    assert rouge_l(refs, hyps) == close(expected["ROUGE-L"])
    assert cider(refs, hyps) == expected["CIDEr"] == 0.0


def test_perfect_corpus_scores_one():
    refs = {i: [h, "something else entirely"] for i, h in HYPS.items()}
    assert bleu(refs, HYPS)[3] == pytest.approx(1.0, abs=1e-8)
    assert rouge_l(refs, HYPS) == pytest.approx(1.0)


def test_cider_is_ten_when_every_reference_equals_the_hypothesis():
    hyps = {i: f"w{i} x{i} y{i} z{i} v{i}" for i in range(5)}
    refs = {i: [h, h] for i, h in hyps.items()}
    assert cider(refs, hyps) == pytest.approx(10.0)


def test_single_image_scores_cider_zero():
    # The IDF is log(#images) - log(df): with one image every reference n-gram weighs 0.
    assert cider({0: REFS["perfect"]}, {0: HYPS["perfect"]}) == 0.0


def test_no_overlap_scores_zero_except_smoothed_bleu():
    hyps = {i: "zebra yak xylophone" for i in REFS}
    assert rouge_l(REFS, hyps) == 0.0
    assert cider(REFS, hyps) == 0.0
    # The toolkit's smoothing leaves BLEU tiny but positive where textbook BLEU is 0.
    assert all(0 < s < 1e-12 for s in bleu(REFS, hyps))


def test_mismatched_ids_raise_with_the_ids():
    with pytest.raises(ValueError, match=r"same image ids.*'b'.*'c'"):
        caption_metrics({"a": ["x"], "b": ["y"]}, {"a": "x", "c": "y"})


def test_empty_references_raise():
    with pytest.raises(ValueError, match="image 'a' has no reference captions"):
        caption_metrics({"a": []}, {"a": "x"})


def test_tokenize_drops_the_toolkit_punctuation():
    caption = "A small red circle , a large blue square and a green cross."
    assert tokenize(caption) == "a small red circle a large blue square and a green cross".split()
    assert tokenize("The dog's ball (red) isn't \"big\"!") == [
        "the", "dog", "'s", "ball", "-lrb-", "red", "-rrb-", "is", "n't", "big",
    ]  # fmt: skip


@needs_java
def test_tokenize_equals_the_toolkit_ptb_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = [
        "a small red circle , a large blue square and a medium green cross",
        "A Small Red Circle, a large blue square and a medium green cross.",
        'The dog\'s ball (red) is "big"!',
        "A t-shirt, 3.5 men... don't go -- ok; yes: no?",
        "two  spaces\tand a tab",
        "It's a cat; we're sure it isn't a [dog] {maybe}.",
    ]
    ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    for i, caption in enumerate(captions):
        assert " ".join(tokenize(caption)) == ptb[i][0], caption


def test_meteor_is_none_without_java(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert meteor(REFS, HYPS) is None
    assert "METEOR" not in caption_metrics(REFS, HYPS)


def test_meteor_is_none_without_pycocoevalcap(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    assert meteor(REFS, HYPS) is None


@needs_java
def test_meteor_runs_the_toolkit_jar():
    # About ten seconds: the jar loads its paraphrase table once per test session.
    score = meteor(REFS, HYPS)
    assert isinstance(score, float) and 0 < score <= 1


@needs_java
def test_meteor_equals_the_toolkit_meteor():
    from pycocoevalcap.meteor.meteor import Meteor

    # The toolkit starts its own jar: another ten seconds, the price of checking the protocol.
    expected, _ = Meteor().compute_score(
        {i: list(rs) for i, rs in REFS.items()}, {i: [h] for i, h in HYPS.items()}
    )
    assert meteor(REFS, HYPS) == close(expected)


def test_caption_metrics_tokenises_then_scores():
    raw_refs = {
        i: [r.replace(" and ", " , and ").upper() + "." for r in rs] for i, rs in REFS.items()
    }
    metrics = caption_metrics(raw_refs, HYPS)
    assert set(metrics) - {"METEOR"} == {f"BLEU-{k}" for k in range(1, 5)} | {"ROUGE-L", "CIDEr"}
    assert metrics["CIDEr"] == close(cider(REFS, HYPS))
    assert metrics["BLEU-4"] == close(bleu(REFS, HYPS)[3])
    assert metrics["ROUGE-L"] == close(rouge_l(REFS, HYPS))
