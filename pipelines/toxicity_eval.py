"""Evaluate, calibrate and export the fallback toxicity scorer (``warehouse.safety``).

    python -m pipelines.toxicity_eval              # precision/recall per category, chosen threshold
    python -m pipelines.toxicity_eval --write      # ... and write sql/toxicity_calibration.tsv
    python -m pipelines.toxicity_eval export       # re-export sql/toxicity_model.tsv (needs the
                                                   # alt-profanity-check package installed)
    python -m pipelines.toxicity_eval bench FILE.parquet [--column t]   # texts/s in DuckDB

The labelled set is ``warehouse/sql/toxicity_labelled.tsv`` (label, category, text). A quarter of
it is held out — crc32(text) % 4 == 0 — and never used to choose the calibration: the threshold,
gate and combination that maximise F1 on the rest; ties go to precision (a false positive
silently removes a good prompt, and ordinary prompts far outnumber toxic ones), then to ``max``
before ``noisy-or``, then to the higher threshold and gate. Precision, recall and F1 are reported
on the held-out part and overall.

``export`` converts the classifier shipped in the ``alt-profanity-check`` package into the plain
TSV the scorer reads. The package loads its own bundled model files with joblib (a pickle) when
it is imported: a trusted artefact of a registry package, used here once, offline; the pipeline
itself never loads a pickle. The conversion checks that the model has the one structure the SQL
reproduces and records, per model file, its SHA-256 and, for a few probe texts, the package's
own probabilities (``@check`` rows), which the tests compare with the SQL scorer.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

import numpy as np

from warehouse.safety import (
    COMBINATIONS,
    PAPER_THRESHOLD,
    Calibration,
    LinearTextModel,
    ModelLexiconScorer,
)

PACKAGE = "alt-profanity-check"
SQL_DIR = Path(str(resources.files("warehouse").joinpath("sql")))
LABELLED = SQL_DIR / "toxicity_labelled.tsv"
MODEL = SQL_DIR / "toxicity_model.tsv"
CALIBRATION = SQL_DIR / "toxicity_calibration.tsv"
HOLDOUT_MODULUS = 4
# Gate candidates. From 2.0 up the gate terms are offensive words (148 terms at 2.0); at 1.5 the
# set takes in comment-data artefacts ("clouds", "white", "mom", "mouth") and the classifier
# would tokenise 3.5 % of ordinary prompts instead of 0.2 %.
GATE_WEIGHTS = (2.0, 2.5, 3.0)
THRESHOLDS = tuple(round(0.05 + 0.01 * i, 2) for i in range(91))  # 0.05 .. 0.95
PROBES = (
    "stupid idiot moron, ugly fat loser, kill him",
    "kill la kill",
    "sex pistols band poster",
    "i will murder you and your family",
    "nazi propaganda poster, swastika",
    "a cat on a sofa",
    "(masterpiece:1.2), sumi-e, dragon in clouds, with wet ink bleeding",
    "Ünïcödé Straße, 東京 at night, café",
)


# -- the labelled set -------------------------------------------------------------------------


@dataclass(frozen=True)
class Labelled:
    """The labelled set as arrays (one entry per line)."""

    texts: list[str]
    toxic: np.ndarray  # bool
    category: np.ndarray  # str
    held_out: np.ndarray  # bool


def held_out(text: str) -> bool:
    return zlib.crc32(text.encode("utf-8")) % HOLDOUT_MODULUS == 0


def load_labelled(path: Path = LABELLED) -> Labelled:
    texts, labels, categories = [], [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3 or parts[0] not in ("0", "1") or not parts[2].strip():
            raise ValueError(f"{path.name} line {lineno}: expected 'label<TAB>category<TAB>text'")
        if (parts[0] == "0") != (parts[1] == "clean"):
            raise ValueError(f"{path.name} line {lineno}: label 0 is category 'clean' and only it")
        labels.append(parts[0] == "1")
        categories.append(parts[1])
        texts.append(parts[2])
    if len(set(texts)) != len(texts):
        raise ValueError(f"{path.name}: duplicate texts")
    return Labelled(
        texts,
        np.array(labels, bool),
        np.array(categories),
        np.array([held_out(t) for t in texts], bool),
    )


# -- metrics and calibration ------------------------------------------------------------------


@dataclass(frozen=True)
class Metrics:
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def __str__(self) -> str:
        return (
            f"precision {self.precision:.3f}  recall {self.recall:.3f}  F1 {self.f1:.3f}  "
            f"(tp {self.tp}, fp {self.fp}, fn {self.fn})"
        )


def metrics(flagged: np.ndarray, toxic: np.ndarray) -> Metrics:
    return Metrics(
        int((flagged & toxic).sum()), int((flagged & ~toxic).sum()), int((~flagged & toxic).sum())
    )


def combined_scores(
    cal: Calibration, lexicon: np.ndarray, probability: np.ndarray, max_weight: np.ndarray
) -> np.ndarray:
    """The scorer's output under ``cal`` from its parts (numpy; the SQL is checked against it)."""
    gated = max_weight >= cal.gate_weight
    return cal.combine(lexicon, np.where(gated, cal.classifier_score(probability), 0.0))


def calibrate(
    lexicon: np.ndarray, probability: np.ndarray, max_weight: np.ndarray, toxic: np.ndarray
) -> tuple[Calibration, Metrics]:
    """The calibration with the best F1 on these texts (ties: precision, ``max``, the higher
    threshold, the higher gate)."""
    best: tuple[tuple[float, float, bool, float, float], Calibration, Metrics] | None = None
    for combination in COMBINATIONS:
        for gate in GATE_WEIGHTS:
            for threshold in THRESHOLDS:
                cal = Calibration(threshold, gate, combination)
                flagged = combined_scores(cal, lexicon, probability, max_weight) > PAPER_THRESHOLD
                m = metrics(flagged, toxic)
                key = (m.f1, m.precision, combination == "max", threshold, gate)
                if best is None or key > best[0]:
                    best = (key, cal, m)
    assert best is not None
    return best[1], best[2]


# -- the report -------------------------------------------------------------------------------


def evaluate(write: bool = False, out=sys.stdout) -> int:
    """Calibrate on the training part, report, and check (or ``write``) the bundled file."""
    data = load_labelled()
    bundled = ModelLexiconScorer.bundled()
    lexicon, probability, max_weight = bundled.parts(data.texts)
    train = ~data.held_out
    chosen, train_metrics = calibrate(
        lexicon[train], probability[train], max_weight[train], data.toxic[train]
    )
    scorer = ModelLexiconScorer(bundled.model, bundled.lexicon, chosen)
    scores = scorer.score(data.texts)  # the production SQL path
    flagged = scores > PAPER_THRESHOLD

    print(
        f"labelled set: {len(data.texts)} texts ({int(data.toxic.sum())} toxic), "
        f"{int(data.held_out.sum())} held out (crc32 % {HOLDOUT_MODULUS} == 0)",
        file=out,
    )
    print(f"scorer: {scorer.name}", file=out)
    print(
        f"chosen on the training part: classifier threshold {chosen.threshold:g} "
        f"(→ score {PAPER_THRESHOLD}), gate weight {chosen.gate_weight:g}, "
        f"combination {chosen.combination}; training {train_metrics}",
        file=out,
    )
    print("\nper category (flagged = score > 0.2):", file=out)
    print(f"  {'category':<16}{'n':>5}{'flagged':>9}{'rate':>7}   held out: n, flagged", file=out)
    for category in sorted(set(data.category), key=lambda c: (c == "clean", c)):
        mask = data.category == category
        hold = mask & data.held_out
        what = "false-positive rate" if category == "clean" else "recall"
        print(
            f"  {category:<16}{mask.sum():>5}{flagged[mask].sum():>9}"
            f"{flagged[mask].mean():>7.2f}   {hold.sum():>3}, {flagged[hold].sum():>3}"
            f"   ({what})",
            file=out,
        )
    print("\nprecision / recall / F1:", file=out)
    parts = {
        "lexicon alone": lexicon > PAPER_THRESHOLD,
        "classifier alone (no gate)": probability > chosen.threshold,
        "classifier + lexicon": flagged,
    }
    for label, pred in parts.items():
        for split, mask in (("held out", data.held_out), ("overall", np.ones_like(train))):
            print(f"  {label:<28}{split:<10}{metrics(pred[mask], data.toxic[mask])}", file=out)
    numpy_twin = combined_scores(chosen, lexicon, probability, max_weight)
    if not np.allclose(numpy_twin, scores, atol=1e-9):
        print("ERROR: the SQL scorer disagrees with its numpy twin", file=out)
        return 1
    misses = [t for t, f, y in zip(data.texts, flagged, data.toxic, strict=True) if y and not f]
    false = [t for t, f, y in zip(data.texts, flagged, data.toxic, strict=True) if f and not y]
    print(f"\nfalse positives ({len(false)}): {false}", file=out)
    print(f"missed ({len(misses)}): {misses}", file=out)
    header = [
        "Calibration of the fallback toxicity scorer (warehouse/safety.py), written by",
        "`python -m pipelines.toxicity_eval --write`: the best F1 on the training part of",
        f"toxicity_labelled.tsv (training {train_metrics}).",
    ]
    if write:
        CALIBRATION.write_text(chosen.to_tsv(header), encoding="utf-8")
        print(f"\nwrote {CALIBRATION}", file=out)
    elif chosen != bundled.calibration:
        print(
            f"\nERROR: the bundled calibration ({bundled.calibration.tag}) is not the one "
            f"chosen ({chosen.tag}); rerun with --write",
            file=out,
        )
        return 1
    return 0


# -- export -----------------------------------------------------------------------------------


def export_model(path: Path = MODEL) -> LinearTextModel:
    """Convert the package's classifier into the TSV model file (see the module docstring)."""
    import profanity_check
    from profanity_check import profanity_check as package
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    vectorizer, model = package.vectorizer, package.model
    params = vectorizer.get_params()
    expected = {
        "analyzer": "word", "binary": False, "lowercase": True, "ngram_range": (1, 1),
        "norm": "l2", "preprocessor": None, "strip_accents": None, "sublinear_tf": False,
        "token_pattern": r"(?u)\b\w\w+\b", "tokenizer": None, "use_idf": True,
    }  # fmt: skip
    wrong = {k: params.get(k) for k, v in expected.items() if params.get(k) != v}
    if not isinstance(vectorizer, TfidfVectorizer) or wrong:
        raise ValueError(f"unexpected vectorizer {type(vectorizer).__name__}: {wrong}")
    folds = model.calibrated_classifiers_ if isinstance(model, CalibratedClassifierCV) else []
    if not folds or any(
        not isinstance(f.estimator, LinearSVC) or f.method != "sigmoid" or len(f.calibrators) != 1
        for f in folds
    ):
        raise ValueError("expected CalibratedClassifierCV(LinearSVC, method='sigmoid')")
    if list(model.classes_) != [0, 1]:
        raise ValueError(f"expected classes [0, 1], got {model.classes_}")
    terms = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.get)
    exported = LinearTextModel(
        source=f"{PACKAGE}=={metadata.version(PACKAGE)}",
        terms=tuple(terms),
        idf=np.asarray(vectorizer.idf_, np.float64),
        weights=np.stack([f.estimator.coef_[0] for f in folds], axis=1),
        intercept=np.array([f.estimator.intercept_[0] for f in folds]),
        sigmoid_a=np.array([f.calibrators[0].a_ for f in folds]),
        sigmoid_b=np.array([f.calibrators[0].b_ for f in folds]),
    )
    data = Path(profanity_check.__file__).parent / "data"
    digests = [
        f"{p.name} sha256 {hashlib.sha256(p.read_bytes()).hexdigest()}"
        for p in sorted(data.glob("*.joblib"))
    ]
    header = [
        f"The classifier of the PyPI package {exported.source} (TF-IDF + "
        f"{len(folds)} Platt-calibrated linear SVMs),",
        "exported by `python -m pipelines.toxicity_eval export`; do not edit by hand.",
        *digests,
        "@check rows: the package's own predict_prob of a probe text (compared by the tests).",
    ]
    checks = package.predict_prob(list(PROBES))
    text = exported.to_tsv(header)
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if not line.startswith(("#", "@")))
    probe_rows = [f"@check\t{p:.10g}\t{t}" for t, p in zip(PROBES, checks, strict=True)]
    path.write_text("\n".join(lines[:at] + probe_rows + lines[at:]) + "\n", encoding="utf-8")
    return exported


def model_checks(path: Path = MODEL) -> list[tuple[str, float]]:
    """The ``@check`` rows of a model file: (probe text, the package's probability)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("@check\t"):
            _, p, text = line.split("\t", 2)
            out.append((text, float(p)))
    return out


# -- throughput -------------------------------------------------------------------------------


def bench(parquet: str, column: str, threads: int) -> None:
    """Score the distinct texts of ``column`` in ``parquet`` as the clean stage does."""
    import duckdb

    scorer = ModelLexiconScorer.bundled()
    con = duckdb.connect(config={"threads": threads})
    con.execute(
        f'CREATE TABLE _src AS SELECT DISTINCT "{column}" AS _text '
        f"FROM read_parquet('{parquet}') WHERE \"{column}\" IS NOT NULL"
    )
    n = con.execute("SELECT count(*) FROM _src").fetchone()[0]
    for label, run in (
        ("lexicon alone", lambda: scorer.lexicon.create_scores(con, "SELECT * FROM _src", "_t")),
        ("classifier + lexicon", lambda: scorer.create_scores(con, "SELECT * FROM _src", "_t")),
    ):
        started, cpu = time.perf_counter(), time.process_time()
        run()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        over, stored = con.execute(
            f"SELECT count(*) FILTER (_toxicity > {PAPER_THRESHOLD}), count(*) FROM _t"
        ).fetchone()
        print(
            f"{label:<22} {n:,} texts in {seconds:.2f} s wall, {cpu:.2f} s CPU "
            f"({threads} threads) = {n / seconds:,.0f} texts/s; "
            f"{over:,} over {PAPER_THRESHOLD}, {stored:,} above 0"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.toxicity_eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--write", action="store_true", help="write the chosen calibration")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("export", help=f"re-export the model from the {PACKAGE} package")
    b = sub.add_parser("bench", help="score the distinct texts of a Parquet column")
    b.add_argument("parquet")
    b.add_argument("--column", default="prompt")
    b.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "export":
        model = export_model()
        print(
            f"wrote {MODEL}: {len(model.terms):,} terms, {len(model.intercept)} folds, "
            f"from {model.source}"
        )
        return 0
    if args.command == "bench":
        bench(args.parquet, args.column, args.threads)
        return 0
    return evaluate(write=args.write)


if __name__ == "__main__":
    sys.exit(main())
