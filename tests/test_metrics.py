import random
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from rl_attn import metrics
from rl_attn.metrics import caption_metrics, meteor, tokenize

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
    """The toolkit's scorers called directly on captions that are already tokenised."""
    gts = {i: list(rs) for i, rs in refs.items()}
    res = {i: [h] for i, h in hyps.items()}
    bleus, _ = Bleu(4).compute_score(gts, res, verbose=0)
    result = {f"BLEU-{k}": s for k, s in enumerate(bleus, start=1)}
    result["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    result["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return result


def scores(refs: dict, hyps: dict) -> dict[str, float]:
    return caption_metrics(refs, hyps, with_meteor=False)


needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs java")


def close(expected: float):
    return pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("corpus", ["fixture", 0, 1, 2])
def test_bleu_rouge_cider_equal_the_toolkit(corpus):
    # The fixtures are tokenised already (tokenize leaves them as they are).
    refs, hyps = (REFS, HYPS) if corpus == "fixture" else random_corpus(corpus)
    expected = toolkit_scores(refs, hyps)
    ours = scores(refs, hyps)
    assert set(ours) == set(expected)
    for name, value in expected.items():
        assert ours[name] == close(value), name


@pytest.mark.parametrize("case", list(REFS))
def test_each_fixture_case_alone_equals_the_toolkit(case):
    # One image at a time shows which rule broke; a single image also pins CIDEr at 0.
    refs, hyps = {case: REFS[case]}, {case: HYPS[case]}
    expected = toolkit_scores(refs, hyps)
    ours = scores(refs, hyps)
    for k in range(1, 5):
        assert ours[f"BLEU-{k}"] == close(expected[f"BLEU-{k}"]), f"BLEU-{k}"
    assert ours["ROUGE-L"] == close(expected["ROUGE-L"])
    assert ours["CIDEr"] == expected["CIDEr"] == 0.0


def test_fixture_scores_are_those_of_the_earlier_reimplementation():
    # Written down from the rule-for-rule re-implementation these scorers replaced: a toolkit
    # upgrade or a change in how the scorers are called shows up here.
    assert scores(REFS, HYPS) == {
        "BLEU-1": close(0.690909090896529),
        "BLEU-2": close(0.6529208292492371),
        "BLEU-3": close(0.6258394908453676),
        "BLEU-4": close(0.604695677579386),
        "ROUGE-L": close(0.5696146052538134),
        "CIDEr": close(3.027111545898797),
    }


def test_scores_are_the_toolkit_scorers_on_our_tokens():
    raw_refs = {
        i: [f"{r[0].upper()}{r[1:]}." for r in rs] + [f'"{rs[0]}" , ok ?'] for i, rs in REFS.items()
    }
    raw_hyps = {i: f"{h} !".replace(" and ", ", and ") for i, h in HYPS.items()}
    gts = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in raw_refs.items()}
    res = {i: [" ".join(tokenize(h))] for i, h in raw_hyps.items()}
    bleus, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = {f"BLEU-{k}": s for k, s in enumerate(bleus, start=1)}
    expected["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr"] = Cider().compute_score(gts, res)[0]
    assert scores(raw_refs, raw_hyps) == expected


def test_nothing_is_printed(capfd):
    scores(REFS, HYPS)
    assert capfd.readouterr() == ("", "")
    # What is kept off stdout: the toolkit's Bleu prints its totals unless told otherwise.
    Bleu(4).compute_score({0: ["a red circle"]}, {0: ["a red circle"]})
    assert "testlen" in capfd.readouterr().out


def test_perfect_corpus_scores_one():
    refs = {i: [h, "something else entirely"] for i, h in HYPS.items()}
    assert scores(refs, HYPS)["BLEU-4"] == pytest.approx(1.0, abs=1e-8)
    assert scores(refs, HYPS)["ROUGE-L"] == pytest.approx(1.0)


def test_cider_is_ten_when_every_reference_equals_the_hypothesis():
    hyps = {i: f"w{i} x{i} y{i} z{i} v{i}" for i in range(5)}
    refs = {i: [h, h] for i, h in hyps.items()}
    assert scores(refs, hyps)["CIDEr"] == pytest.approx(10.0)


def test_single_image_scores_cider_zero():
    # The IDF is log(#images) - log(df): with one image every reference n-gram weighs 0.
    assert scores({0: REFS["perfect"]}, {0: HYPS["perfect"]})["CIDEr"] == 0.0


def test_no_overlap_scores_zero_except_smoothed_bleu():
    result = scores(REFS, {i: "zebra yak xylophone" for i in REFS})
    assert result["ROUGE-L"] == 0.0
    assert result["CIDEr"] == 0.0
    # The toolkit's smoothing leaves BLEU tiny but positive where textbook BLEU is 0.
    assert all(0 < result[f"BLEU-{k}"] < 1e-12 for k in range(1, 5))


def test_empty_hypothesis_scores_rouge_zero_even_against_an_empty_reference():
    refs = {"a": ["a red circle", "!"], "b": ["a blue square", "a square"]}
    hyps = {"a": "", "b": "a blue square"}
    result = scores(refs, hyps)
    assert result["ROUGE-L"] == 0.5
    # Bare, the toolkit's Rouge matches the empty caption with the empty reference: a perfect 1.
    tokenised = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in refs.items()}
    assert toolkit_scores(tokenised, hyps)["ROUGE-L"] == 1.0
    assert result["CIDEr"] == close(toolkit_scores(tokenised, hyps)["CIDEr"])


def test_references_without_words_score_cider_zero():
    # Bare, the toolkit's Cider fails here with "max() arg is an empty sequence".
    result = scores({"a": ["."], "b": ["!", ","]}, {"a": "a cat", "b": ""})
    assert result["CIDEr"] == 0.0
    assert result["ROUGE-L"] == 0.0


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


def test_meteor_is_none_without_the_jar(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "_METEOR_JAR", tmp_path / "meteor-1.5.jar")
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
    result = caption_metrics(raw_refs, HYPS)
    expected = scores(REFS, HYPS)
    if shutil.which("java") is not None:
        expected["METEOR"] = meteor(REFS, HYPS)
    assert result == {name: close(value) for name, value in expected.items()}
