"""The toxicity scorers: lexicon, exported classifier + lexicon (the fallback), Detoxify."""

from __future__ import annotations

import importlib.util
import logging
import sys
import types

import duckdb
import numpy as np
import pytest

from pipelines.toxicity_eval import (
    MODEL,
    calibrate,
    combined_scores,
    load_labelled,
    metrics,
    model_checks,
)
from tests.factory import image_row, model_row, write_release
from warehouse.clean import CleanConfig, clean_release_table, images_spec
from warehouse.duck import connect
from warehouse.lake import Lake
from warehouse.release import discover, land_release_table, open_landing
from warehouse.safety import (
    PAPER_THRESHOLD,
    Calibration,
    DetoxifyScorer,
    LexiconScorer,
    LinearTextModel,
    ModelLexiconScorer,
    load_lexicon,
    make_scorer,
    prefilter_sql,
)
from warehouse.schema import IMAGES

INSULT = "stupid idiot moron, ugly fat loser, kill him"
TRICKY_CLEAN = [
    "sex pistols band poster",
    "bloody mary cocktail on a bar counter",
    "headshot photo of a business woman",
    "killer whale jumping out of the ocean",
    "hollywood bombshell, 1950s glamour portrait",
    "bloody sunset over the sea, dramatic clouds",
    "a long exposure shot of a city at night",
]


@pytest.fixture(scope="module")
def scorer() -> LexiconScorer:
    return LexiconScorer.bundled()


@pytest.fixture(scope="module")
def fallback() -> ModelLexiconScorer:
    return ModelLexiconScorer.bundled()


@pytest.fixture(scope="module")
def labelled():
    return load_labelled()


# -- the lexicon ------------------------------------------------------------------------------


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
    assert scorer.score(["I will KILL YOU"])[0] == pytest.approx(scorer.terms["kill you"])


def test_bad_lexicon_lines_are_clear_errors(tmp_path):
    bad = tmp_path / "lex.tsv"
    bad.write_text("gore\t1.5\n")
    with pytest.raises(ValueError, match="not in"):
        load_lexicon(bad)
    bad.write_text("gore\n")
    with pytest.raises(ValueError, match="expected"):
        load_lexicon(bad)


# -- the prefilter ----------------------------------------------------------------------------


def test_prefilter_passes_texts_that_lowercase_to_a_term(scorer, fallback):
    # DuckDB lowercases U+0130 (İ) to i and U+212A (Kelvin sign) to k; RE2's (?i) does not
    # match them, so the prefilter lets such texts through instead of dropping them.
    sneaky = ["KİLL YOU", "\u212aILL YOU", "İDİOT MORON STUPİD"]
    assert (scorer.score(sneaky[:2]) == scorer.terms["kill you"]).all()
    assert (fallback.score(sneaky) > PAPER_THRESHOLD).all()
    plain = ["a cat on a sofa", "İstanbul skyline", "gored", "skilled"]
    assert (scorer.score(plain) == 0).all()


def test_prefilter_passes_only_candidate_texts(fallback):
    texts = ["KİLL YOU", "\u212aILL YOU", "Kill You", "you IDIOT", "Kodak K-1230 skill", "a cat"]
    con = duckdb.connect()
    passed = [
        r[0]
        for r in con.execute(
            f"SELECT {fallback.prefilter_sql('t')} FROM unnest($texts) WITH ORDINALITY u(t, i) "
            "ORDER BY i",
            {"texts": texts},
        ).fetchall()
    ]
    assert passed == [True, True, True, True, False, False]


def test_prefilter_terms_must_be_ascii():
    with pytest.raises(ValueError, match="ASCII"):
        prefilter_sql(["gore", "café"], "t")


# -- the exported classifier ------------------------------------------------------------------


def test_exported_model_reproduces_the_package_probabilities(fallback):
    checks = model_checks(MODEL)
    assert len(checks) >= 5
    texts = [t for t, _ in checks]
    _, probability, _ = fallback.parts(texts)
    np.testing.assert_allclose(probability, [p for _, p in checks], atol=1e-8)


def test_exported_model_matches_the_installed_package(fallback, labelled, tmp_path):
    package = pytest.importorskip("profanity_check")
    from pipelines.toxicity_eval import export_model

    texts = labelled.texts + ["Ünïcödé Straße, 東京, café", "x²³ ½ ①②", "ΣΊΣΥΦΟΣ"]
    _, probability, _ = fallback.parts(texts)
    np.testing.assert_allclose(probability, package.predict_prob(texts), atol=1e-8)
    # the conversion is reproducible: re-exporting gives the bundled file byte for byte
    out = tmp_path / "model.tsv"
    export_model(out)
    assert out.read_text(encoding="utf-8") == MODEL.read_text(encoding="utf-8")


def test_bad_model_files_are_clear_errors(tmp_path):
    good = MODEL.read_text(encoding="utf-8").splitlines()
    path = tmp_path / "model.tsv"
    cases = {
        "missing @intercept": [line for line in good if not line.startswith("@intercept")],
        "fold weights": [*good, "qqzyx\t1.0\t0.5"],
        "not a lowercase token": [*good, "Qqzyx\t1.0\t0.1\t0.1\t0.1\t0.1\t0.1"],
        "duplicate": [*good, good[-1]],
        "finite": [*good, "qqzyx\t1.0\tnan\t0.1\t0.1\t0.1\t0.1"],
    }
    for message, lines in cases.items():
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            LinearTextModel.load(path)
    path.write_text("\n".join(good) + "\n", encoding="utf-8")
    assert len(LinearTextModel.load(path).terms) == len(LinearTextModel.load().terms)


# -- the fallback: classifier + lexicon -------------------------------------------------------


def test_make_scorer_without_checkpoint_is_the_classifier_with_the_lexicon(fallback):
    chosen = make_scorer(None)
    assert isinstance(chosen, ModelLexiconScorer)
    assert chosen.name == fallback.name
    assert "alt-profanity-check-1.9.1" in chosen.name and "lexicon-v2" in chosen.name


def test_insults_threats_and_hate_are_flagged_tricky_words_are_not(fallback, scorer):
    toxic = [
        INSULT,
        "you are a stupid worthless idiot",
        "i will murder you and your family",
        "nazi propaganda poster, swastika",
    ]
    assert scorer.score(["stupid idiot moron, ugly fat loser"])[0] == 0.0  # lexicon alone misses
    assert (fallback.score(toxic) > PAPER_THRESHOLD).all()
    assert (fallback.score(TRICKY_CLEAN) <= PAPER_THRESHOLD).all()


def test_the_classifier_votes_only_on_gated_texts(fallback):
    texts = [
        "(masterpiece:1.2), sumi-e, dragon in clouds, with wet ink bleeding",  # no lexicon term
        "wet dog, knife",  # a mild lexicon term: passes the prefilter, scored by the lexicon
        INSULT,
    ]
    lexicon, probability, max_weight = fallback.parts(texts)
    assert (probability > fallback.calibration.threshold).all()
    assert (max_weight >= fallback.calibration.gate_weight).tolist() == [False, False, True]
    scores = fallback.score(texts)
    assert scores[0] == lexicon[0] == 0.0
    assert scores[1] == lexicon[1] == pytest.approx(fallback.lexicon.terms["knife"])
    assert scores[2] > PAPER_THRESHOLD


def test_classifier_probability_maps_its_threshold_onto_the_paper_threshold():
    cal = Calibration(threshold=0.6, gate_weight=2.0)
    p = np.array([0.0, 0.3, 0.6, 0.61, 0.8, 1.0])
    mapped = cal.classifier_score(p)
    np.testing.assert_allclose(mapped[[0, 2, 5]], [0.0, PAPER_THRESHOLD, 1.0])
    assert (np.diff(mapped) > 0).all()
    assert mapped[1] < PAPER_THRESHOLD < mapped[3]
    assert cal.combine(np.array([0.3]), np.array([0.1]))[0] == 0.3
    noisy = Calibration(0.6, 2.0, "noisy-or").combine(np.array([0.3]), np.array([0.1]))[0]
    assert noisy == pytest.approx(1 - 0.7 * 0.9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 1.0, "gate_weight": 2.0}, "threshold"),
        ({"threshold": 0.5, "gate_weight": 0.0}, "gate_weight"),
        ({"threshold": 0.5, "gate_weight": 2.0, "combination": "sum"}, "combination"),
    ],
)
def test_bad_calibrations_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Calibration(**kwargs)


def test_calibration_file_errors_and_a_gate_no_term_reaches(tmp_path, fallback):
    path = tmp_path / "cal.tsv"
    path.write_text("threshold\t0.5\ngate_weight\t2\n")
    with pytest.raises(ValueError, match="combination"):
        Calibration.load(path)
    with pytest.raises(ValueError, match="no vocabulary term"):
        ModelLexiconScorer(fallback.model, fallback.lexicon, Calibration(0.5, 1e6))


def test_sql_scores_equal_their_numpy_twin(fallback, labelled):
    expected = combined_scores(fallback.calibration, *fallback.parts(labelled.texts))
    np.testing.assert_allclose(fallback.score(labelled.texts), expected, atol=1e-9)


def test_bundled_calibration_is_the_one_chosen_on_the_training_part(fallback, labelled):
    lexicon, probability, max_weight = fallback.parts(labelled.texts)
    train = ~labelled.held_out
    assert 0 < train.sum() < len(labelled.texts)
    chosen, _ = calibrate(
        lexicon[train], probability[train], max_weight[train], labelled.toxic[train]
    )
    assert chosen == fallback.calibration


def test_held_out_quality_beats_the_lexicon_alone(fallback, scorer, labelled):
    hold = labelled.held_out
    assert labelled.toxic[hold].any() and (~labelled.toxic[hold]).any()
    texts = [t for t, h in zip(labelled.texts, hold, strict=True) if h]
    both = metrics(fallback.score(texts) > PAPER_THRESHOLD, labelled.toxic[hold])
    alone = metrics(scorer.score(texts) > PAPER_THRESHOLD, labelled.toxic[hold])
    assert both.f1 > alone.f1
    assert both.f1 >= 0.8 and both.precision >= 0.9


def test_bad_labelled_lines_are_clear_errors(tmp_path):
    path = tmp_path / "labelled.tsv"
    for text, message in [
        ("1\tinsult\n", "expected"),
        ("0\tinsult\tyou idiot\n", "clean"),
        ("1\tinsult\tidiot\n1\tinsult\tidiot\n", "duplicate"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_labelled(path)


def test_clean_stage_with_the_fallback_records_scorer_and_score(tmp_path, fallback):
    images = [
        image_row(1, prompt="a cat on a sofa"),
        image_row(2, prompt=INSULT),
        image_row(3, prompt="kill la kill, ryuko matoi"),  # gated, classifier above threshold
        image_row(4, prompt="sex pistols band poster"),  # gated, classifier below threshold
    ]
    release = write_release(tmp_path / "r", images, [model_row(1)])
    lake = Lake(str(tmp_path / "lake"))
    log = logging.getLogger("test")
    land_release_table(lake, "raw/images", discover(str(release), IMAGES), IMAGES, log=log)
    con = connect(lake)
    cfg = CleanConfig()
    landing = open_landing(lake, "raw/images", IMAGES, "salt")
    report = clean_release_table(con, lake, images_spec(cfg), cfg, make_scorer(None), landing, log)
    assert report.scorer == fallback.name
    kept = sorted(
        r[0] for r in con.execute(f"SELECT imageId FROM {lake.scan('images')}").fetchall()
    )
    assert kept == [1, 4]
    details = dict(
        con.execute(
            f"SELECT record_key, detail FROM {lake.scan('quarantine/images')} "
            "WHERE reason = 'unsafe: toxic prompt'"
        ).fetchall()
    )
    assert sorted(k.split("/")[0] for k in details) == ["imageId=2", "imageId=3"]
    assert len(details) == 2
    assert all(fallback.name in d and "> 0.2" in d for d in details.values())
    assert 0 < report.max_kept_toxicity <= PAPER_THRESHOLD  # "sex" gated, scored below


# -- Detoxify ---------------------------------------------------------------------------------


def test_scorer_choice(tmp_path):
    with pytest.raises(FileNotFoundError):
        make_scorer(str(tmp_path / "missing.ckpt"))
    ckpt = tmp_path / "toxic.ckpt"
    ckpt.write_bytes(b"x")
    if importlib.util.find_spec("detoxify") is None:
        with pytest.raises(RuntimeError, match="pip install detoxify"):
            DetoxifyScorer(str(ckpt))
    else:
        # a corrupt checkpoint is an error, never a silent fall back to another scorer
        with pytest.raises(Exception) as failure:
            make_scorer(str(ckpt))
        assert "pip install detoxify" not in str(failure.value)


def test_detoxify_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    ckpt = tmp_path / "toxic.ckpt"
    ckpt.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "detoxify", None)  # import fails
    with pytest.raises(RuntimeError, match="pip install detoxify"):
        make_scorer(str(ckpt))


def test_detoxify_scores_in_batches_from_the_local_checkpoint(tmp_path, monkeypatch):
    ckpt = tmp_path / "toxic.ckpt"
    ckpt.write_bytes(b"x")
    calls = []

    class FakeDetoxify:
        def __init__(self, kind, checkpoint, device):
            calls.append(("init", kind, checkpoint, device))

        def predict(self, texts):
            calls.append(("predict", list(texts)))
            return {"toxicity": [0.9 if "idiot" in t else 0.01 for t in texts]}

    monkeypatch.setitem(sys.modules, "detoxify", types.SimpleNamespace(Detoxify=FakeDetoxify))
    scorer = make_scorer(str(ckpt))
    assert isinstance(scorer, DetoxifyScorer) and scorer.name == "detoxify-original"
    scorer.batch_size = 2
    scores = scorer.score(["you idiot", None, "a cat"])
    np.testing.assert_allclose(scores, [0.9, 0.01, 0.01])
    assert calls == [
        ("init", "original", str(ckpt), "cpu"),
        ("predict", ["you idiot", ""]),
        ("predict", ["a cat"]),
    ]
