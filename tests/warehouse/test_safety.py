from __future__ import annotations

import pytest

from warehouse.safety import DetoxifyScorer, LexiconScorer, load_lexicon, make_scorer


@pytest.fixture(scope="module")
def scorer() -> LexiconScorer:
    return LexiconScorer.bundled()


def test_whole_words_only_and_case_insensitive(scorer):
    scores = scorer.score(["GORE everywhere", "goreless hills", "a gorey mess", None, ""])
    assert scores[0] > 0.2
    assert scores[1] == scores[2] == scores[3] == scores[4] == 0.0


def test_terms_combine_as_independent_probabilities(scorer):
    terms = scorer.terms
    blood, gun = terms["blood"], terms["gun"]
    combined = scorer.score(["blood and a gun"])[0]
    assert combined == pytest.approx(1 - (1 - blood) * (1 - gun))
    # repeating a term does not raise the score
    assert scorer.score(["blood blood blood"])[0] == pytest.approx(blood)


def test_mild_words_alone_stay_under_the_paper_threshold(scorer):
    assert max(scorer.score(["a knife on a table", "a bloody steak", "horror movie poster"])) <= 0.2


def test_multiword_and_hyphenated_terms(scorer):
    assert scorer.score(["self-harm scene"])[0] == pytest.approx(scorer.terms["self-harm"])


def test_bad_lexicon_lines_are_clear_errors(tmp_path):
    bad = tmp_path / "lex.tsv"
    bad.write_text("gore\t1.5\n")
    with pytest.raises(ValueError, match="not in"):
        load_lexicon(bad)
    bad.write_text("gore\n")
    with pytest.raises(ValueError, match="expected"):
        load_lexicon(bad)


def test_scorer_choice(tmp_path):
    assert isinstance(make_scorer(None), LexiconScorer)
    with pytest.raises(FileNotFoundError):
        make_scorer(str(tmp_path / "missing.ckpt"))
    ckpt = tmp_path / "toxic.ckpt"
    ckpt.write_bytes(b"x")
    try:
        import detoxify  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install detoxify"):
            DetoxifyScorer(str(ckpt))
