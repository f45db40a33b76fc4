"""Prompt toxicity scorers for the safety filter (paper: drop prompts whose toxicity > 0.2).

Three scorers behind one interface (:class:`ToxicityScorer`):

* :class:`DetoxifyScorer` — the paper's Detoxify model, used when a checkpoint path is
  configured (``IMAGEGEM_DETOXIFY_CHECKPOINT``); nothing is downloaded.
* :class:`ModelLexiconScorer` — the fallback when no checkpoint is configured: a trained
  linear text classifier (:class:`LinearTextModel`, TF-IDF + five calibrated linear SVMs, the
  model shipped inside the PyPI package ``alt-profanity-check``, trained on human-labelled toxic
  comments) combined with the lexicon, which covers the sexual and violent terms the comment
  classifier is weak at. The model's weights were exported once into
  ``sql/toxicity_model.tsv`` (``python -m pipelines.toxicity_eval export``), so scoring runs
  as plain DuckDB SQL: no pickle is loaded at run time and millions of texts are scored in
  the database. (Only that export command imports the package, which loads its own bundled
  model files with joblib — a pickle, but the registry package's trusted artefact; this code
  never calls pickle or joblib itself.) Its threshold and gate are calibrated on a labelled set
  (``sql/toxicity_labelled.tsv``, ``python -m pipelines.toxicity_eval``) and kept in
  ``sql/toxicity_calibration.tsv``.
* :class:`LexiconScorer` — the transparent bundled lexicon (``sql/toxicity_lexicon.tsv``):
  toxicity = 1 − ∏(1 − weight) over the distinct lexicon terms found as whole words, one
  DuckDB macro.

The SQL scorers (:class:`SqlToxicityScorer`) fill the clean stage's table of scores inside
DuckDB (:meth:`create_scores`); their ``score`` runs the same SQL on a Python list (one home
for each rule). Which scorer ran (name and version) is recorded in the clean stage's metadata
and in each quarantine detail.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Protocol, runtime_checkable

import duckdb
import numpy as np
import pyarrow as pa

from warehouse.duck import quote

# The paper's threshold: a classifier probability at its calibrated threshold maps to this score.
PAPER_THRESHOLD = 0.2
# A token as the exported vectorizer sees it: scikit-learn's ``(?u)\b\w\w+\b`` after lower(),
# i.e. a maximal run of two or more letters, digits or underscores (RE2 syntax).
TOKEN_PATTERN = r"[\pL\pN_]{2,}"
COMBINATIONS = ("max", "noisy-or")


class ToxicityScorer(Protocol):
    """Scores texts in [0, 1]; ``name`` says which scorer (and version) ran."""

    name: str

    def score(self, texts: Sequence[str | None]) -> np.ndarray: ...


@runtime_checkable
class SqlToxicityScorer(Protocol):
    """A scorer that runs inside DuckDB."""

    name: str

    def create_scores(self, con: duckdb.DuckDBPyConnection, source_sql: str, table: str) -> None:
        """``CREATE TEMP TABLE table(_text, _toxicity)``: the texts of ``source_sql`` (one
        VARCHAR column ``_text``, distinct, not null) whose toxicity is above zero."""
        ...

    def prefilter_pattern(self) -> str:
        """An RE2 pattern every text that can score above zero matches (texts it does not
        match score exactly 0, so a caller may skip them)."""
        ...

    def score(self, texts: Sequence[str | None]) -> np.ndarray: ...


def _bundled_text(name: str) -> str:
    return resources.files("warehouse").joinpath(f"sql/{name}").read_text(encoding="utf-8")


def _data_lines(text: str) -> list[tuple[int, list[str]]]:
    """(line number, tab-separated fields) of the non-comment, non-blank lines."""
    return [
        (lineno, line.split("\t"))
        for lineno, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.startswith("#")
    ]


def _score_list(scorer: SqlToxicityScorer, texts: Sequence[str | None]) -> np.ndarray:
    """Scores of a Python list through the scorer's own SQL (None and "" score 0)."""
    con = duckdb.connect()
    try:
        con.register("_texts_in", pa.table({"_text": pa.array(list(texts), pa.string())}))
        scorer.create_scores(
            con, "SELECT DISTINCT _text FROM _texts_in WHERE _text IS NOT NULL", "_scores"
        )
        found = dict(con.execute("SELECT _text, _toxicity FROM _scores").fetchall())
    finally:
        con.close()
    return np.array([found.get(t, 0.0) if t is not None else 0.0 for t in texts], np.float64)


# -- the lexicon ------------------------------------------------------------------------------


def load_lexicon(path: Path | None = None) -> dict[str, float]:
    """The bundled lexicon, term → weight (weights in (0, 1])."""
    text = path.read_text(encoding="utf-8") if path else _bundled_text("toxicity_lexicon.tsv")
    terms: dict[str, float] = {}
    for lineno, parts in _data_lines(text):
        if len(parts) < 2:
            raise ValueError(f"toxicity lexicon line {lineno}: expected 'term<TAB>weight'")
        term, weight = parts[0].strip().lower(), float(parts[1])
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"toxicity lexicon line {lineno}: weight {weight} not in (0, 1]")
        terms[term] = weight
    return terms


def _alternation(terms: Sequence[str]) -> str:
    return "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))


def prefilter_pattern(terms: Sequence[str]) -> str:
    """An RE2 pattern that finds every text whose ``lower()`` contains one of ``terms``
    (ASCII) as a whole word.

    Case-insensitive on the raw text, so no lowercased copy of every text is made. It cannot
    miss a text: the only characters DuckDB lowercases to ASCII from outside ASCII are U+0130
    (İ → i) and U+212A (Kelvin sign → k), which RE2's case folding does not (or, next to
    RE2's ASCII ``\\b``, cannot) match, so any text containing one of them passes too (that
    class sits outside the case-insensitive group: under ``(?i)`` it would match every k).
    It may pass a few more texts (e.g. ``ſ`` folds to ``s``): the scorer decides on those.
    The same pattern runs in DuckDB (:func:`prefilter_sql`) and in Arrow
    (``pyarrow.compute.match_substring_regex``), both RE2.
    """
    bad = [t for t in terms if not t.isascii()]
    if bad:
        raise ValueError(f"prefilter terms must be ASCII, got {bad[:5]}")
    return rf"(?i:\b({_alternation(terms)})\b)|[\x{{130}}\x{{212A}}]"


def prefilter_sql(terms: Sequence[str], column: str) -> str:
    """SQL: true for the texts of ``column`` that :func:`prefilter_pattern` finds."""
    return f"regexp_matches({column}, {quote(prefilter_pattern(terms))})"


@dataclass
class LexiconScorer:
    """Whole-word lexicon scorer, evaluated as the DuckDB macro ``toxicity(text)``."""

    terms: dict[str, float]
    name: str = "lexicon-v2"

    @classmethod
    def bundled(cls) -> LexiconScorer:
        return cls(load_lexicon())

    def macro_sql(self) -> str:
        """``CREATE MACRO toxicity(p)`` for this lexicon."""
        pattern = quote(rf"\b({_alternation(list(self.terms))})\b")
        weights = ", ".join(f"{quote(t)}: {w!r}" for t, w in sorted(self.terms.items()))
        return (
            "CREATE OR REPLACE MACRO toxicity(p) AS CASE WHEN p IS NULL THEN 0.0 ELSE "
            "1.0 - coalesce(list_aggregate(list_transform("
            f"list_distinct(regexp_extract_all(lower(p), {pattern}, 1)), "
            f"lambda t: 1.0 - map_extract_value(MAP {{{weights}}}, t)), 'product'), 1.0) END"
        )

    def prefilter_pattern(self) -> str:
        """RE2: a text can score above zero only if this finds it (:func:`prefilter_pattern`)."""
        return prefilter_pattern(list(self.terms))

    def prefilter_sql(self, column: str) -> str:
        """A cheap match of any term (:func:`prefilter_sql`), before scoring."""
        return prefilter_sql(list(self.terms), column)

    def install(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute(self.macro_sql())

    def create_scores(self, con: duckdb.DuckDBPyConnection, source_sql: str, table: str) -> None:
        self.install(con)
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT _text, toxicity(_text) AS _toxicity "
            f"FROM ({source_sql}) WHERE {self.prefilter_sql('_text')} AND toxicity(_text) > 0"
        )

    def score(self, texts: Sequence[str | None]) -> np.ndarray:
        return _score_list(self, texts)


# -- the trained linear text classifier -------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LinearTextModel:
    """A TF-IDF + calibrated-linear-SVM text classifier, as exported to ``toxicity_model.tsv``.

    For a text: x = (count of each vocabulary token) × idf, l2-normalised (tokens outside the
    vocabulary, stop words among them, are ignored); for each of the k cross-validation folds,
    f = x · weights[:, fold] + intercept[fold] and p_fold = 1 / (1 + exp(a[fold] f + b[fold]))
    (Platt scaling); the probability is the mean of the k p_fold. This is scikit-learn's
    ``CalibratedClassifierCV(LinearSVC).predict_proba`` on ``TfidfVectorizer.transform`` to
    1e-9 (tests compare it with the package's own probabilities), except where DuckDB's
    ``lower()`` and Python's differ (U+0130 İ: DuckDB gives "i", Python "i̇", so DuckDB sees
    the word). Meta rows other than ``@source``, ``@intercept``, ``@sigmoid_a`` and
    ``@sigmoid_b`` (the export's ``@check`` rows) are ignored here.
    """

    source: str  # "package==version" the weights were exported from
    terms: tuple[str, ...] = field(repr=False)
    idf: np.ndarray = field(repr=False)  # (n_terms,)
    weights: np.ndarray = field(repr=False)  # (n_terms, k)
    intercept: np.ndarray  # (k,)
    sigmoid_a: np.ndarray  # (k,)
    sigmoid_b: np.ndarray  # (k,)

    @property
    def name(self) -> str:
        return self.source.replace("==", "-")

    @property
    def mean_weights(self) -> np.ndarray:
        return self.weights.mean(axis=1)

    def prior(self) -> float:
        """The probability of a text without any vocabulary token (all features zero)."""
        p = 1.0 / (1.0 + np.exp(self.sigmoid_a * self.intercept + self.sigmoid_b))
        return float(p.mean())

    @classmethod
    def load(cls, path: Path | None = None) -> LinearTextModel:
        """Parse a model file: ``@key<TAB>values`` rows, then ``term<TAB>idf<TAB>w_1..w_k``."""
        text = path.read_text(encoding="utf-8") if path else _bundled_text("toxicity_model.tsv")
        meta: dict[str, list[str]] = {}
        terms: list[str] = []
        rows: list[list[float]] = []
        for lineno, parts in _data_lines(text):
            if parts[0].startswith("@"):
                meta[parts[0][1:]] = parts[1:]
                continue
            term = parts[0]
            if not re.fullmatch(r"\w{2,}", term) or term != term.lower():
                raise ValueError(f"toxicity model line {lineno}: {term!r} is not a lowercase token")
            try:
                values = [float(v) for v in parts[1:]]
            except ValueError as exc:
                raise ValueError(f"toxicity model line {lineno}: {exc}") from exc
            terms.append(term)
            rows.append(values)
        for key in ("source", "intercept", "sigmoid_a", "sigmoid_b"):
            if key not in meta:
                raise ValueError(f"toxicity model: missing @{key} row")
        folds = len(meta["intercept"])
        if not rows or folds == 0:
            raise ValueError("toxicity model: no vocabulary or no folds")
        if any(len(r) != folds + 1 for r in rows):
            raise ValueError(f"toxicity model: every term needs idf and {folds} fold weights")
        if len(set(terms)) != len(terms):
            raise ValueError("toxicity model: duplicate terms")
        matrix = np.array(rows, dtype=np.float64)
        params = {k: np.array([float(v) for v in meta[k]]) for k in ("sigmoid_a", "sigmoid_b")}
        if any(len(v) != folds for v in params.values()):
            raise ValueError("toxicity model: @sigmoid_a/@sigmoid_b need one value per fold")
        if not np.isfinite(matrix).all() or (matrix[:, 0] <= 0).any():
            raise ValueError("toxicity model: weights must be finite and idf positive")
        return cls(
            source=meta["source"][0],
            terms=tuple(terms),
            idf=matrix[:, 0],
            weights=matrix[:, 1:],
            intercept=np.array([float(v) for v in meta["intercept"]]),
            sigmoid_a=params["sigmoid_a"],
            sigmoid_b=params["sigmoid_b"],
        )

    def to_tsv(self, header: Sequence[str] = ()) -> str:
        """The model file (``header`` lines become comments); :meth:`load` reads it back."""

        def fmt(values: np.ndarray) -> str:
            return "\t".join(f"{v:.10g}" for v in values)

        lines = [f"# {h}" for h in header]
        lines.append(f"@source\t{self.source}")
        lines.append(f"@intercept\t{fmt(self.intercept)}")
        lines.append(f"@sigmoid_a\t{fmt(self.sigmoid_a)}")
        lines.append(f"@sigmoid_b\t{fmt(self.sigmoid_b)}")
        for i, term in enumerate(self.terms):
            lines.append(f"{term}\t{self.idf[i]:.10g}\t{fmt(self.weights[i])}")
        return "\n".join(lines) + "\n"

    def vocabulary_table(self) -> pa.Table:
        """term, idf, w0..w{k-1} and ``mean_w``, the mean fold weight."""
        columns = {"term": list(self.terms), "idf": self.idf}
        for fold in range(self.weights.shape[1]):
            columns[f"w{fold}"] = self.weights[:, fold]
        columns["mean_w"] = self.mean_weights
        return pa.table(columns)

    def probability_sql(self, docs: str, vocab: str) -> str:
        """SELECT _id, _max_weight, _p over ``docs(_id, _text)``: for each text with at least
        one vocabulary token, the largest mean fold weight among them (the gate compares it)
        and the classifier probability."""
        folds = range(len(self.intercept))
        dots = ", ".join(f"sum(_x * w{k}) AS _d{k}" for k in folds)
        probs = " + ".join(
            f"1.0 / (1.0 + exp({float(self.sigmoid_a[k])!r} * "
            f"({float(self.intercept[k])!r} + _d{k} / _norm) + {float(self.sigmoid_b[k])!r}))"
            for k in folds
        )
        return f"""
        WITH _tokens AS (
            SELECT _id, unnest(regexp_extract_all(lower(_text), {quote(TOKEN_PATTERN)})) AS term
            FROM {docs}
        ),
        _tf AS (SELECT _id, term, count(*) AS _n FROM _tokens GROUP BY ALL),
        _features AS (
            SELECT _id, _n * v.idf AS _x, v.* EXCLUDE (term, idf)
            FROM _tf JOIN {vocab} v USING (term)
        ),
        _dots AS (
            SELECT _id, max(mean_w) AS _max_weight, sqrt(sum(_x * _x)) AS _norm, {dots}
            FROM _features GROUP BY _id
        )
        SELECT _id, _max_weight, ({probs}) / {len(folds)} AS _p FROM _dots"""


# -- the fallback: classifier + lexicon -------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """How the classifier's probability becomes a toxicity score (``toxicity_calibration.tsv``).

    * ``threshold``: the classifier probability that maps to the paper's 0.2 (piecewise linear:
      [0, threshold] → [0, 0.2], [threshold, 1] → [0.2, 1]), so the clean stage's one
      threshold keeps its meaning;
    * ``gate_weight``: the classifier votes only on texts with at least one token whose mean
      fold weight is ≥ this (a strongly toxic word) — the rest score by the lexicon alone;
    * ``combination``: ``max`` or ``noisy-or`` of the lexicon score and the classifier score.
    """

    threshold: float
    gate_weight: float
    combination: str = "max"

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "gate_weight", float(self.gate_weight))
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"calibration threshold {self.threshold} not in (0, 1)")
        if not math.isfinite(self.gate_weight) or self.gate_weight <= 0:
            raise ValueError(f"calibration gate_weight {self.gate_weight} must be positive")
        if self.combination not in COMBINATIONS:
            raise ValueError(f"calibration combination {self.combination!r} not in {COMBINATIONS}")

    @classmethod
    def load(cls, path: Path | None = None) -> Calibration:
        text = (
            path.read_text(encoding="utf-8") if path else _bundled_text("toxicity_calibration.tsv")
        )
        values = {parts[0]: parts[1] for _, parts in _data_lines(text) if len(parts) >= 2}
        missing = {"threshold", "gate_weight", "combination"} - set(values)
        if missing:
            raise ValueError(f"toxicity calibration: missing {sorted(missing)}")
        return cls(float(values["threshold"]), float(values["gate_weight"]), values["combination"])

    def to_tsv(self, header: Sequence[str] = ()) -> str:
        lines = [f"# {h}" for h in header]
        lines += [
            f"threshold\t{self.threshold:g}",
            f"gate_weight\t{self.gate_weight:g}",
            f"combination\t{self.combination}",
        ]
        return "\n".join(lines) + "\n"

    @property
    def tag(self) -> str:
        return f"t={self.threshold:g},gate={self.gate_weight:g},{self.combination}"

    def classifier_score(self, p: np.ndarray) -> np.ndarray:
        """The probability → score map (numpy twin of :meth:`classifier_score_sql`)."""
        t = self.threshold
        low = PAPER_THRESHOLD * p / t
        high = PAPER_THRESHOLD + (1 - PAPER_THRESHOLD) * (p - t) / (1 - t)
        return np.where(p <= t, low, high)

    def classifier_score_sql(self, p: str) -> str:
        t = self.threshold
        return (
            f"CASE WHEN {p} <= {t!r} THEN {PAPER_THRESHOLD!r} * {p} / {t!r} "
            f"ELSE {PAPER_THRESHOLD!r} + {1 - PAPER_THRESHOLD!r} * ({p} - {t!r}) / {1 - t!r} END"
        )

    def combine(self, lexicon: np.ndarray, classifier: np.ndarray) -> np.ndarray:
        if self.combination == "max":
            return np.maximum(lexicon, classifier)
        return 1 - (1 - lexicon) * (1 - classifier)

    def combine_sql(self, lexicon: str, classifier: str) -> str:
        if self.combination == "max":
            return f"greatest({lexicon}, {classifier})"
        return f"1.0 - (1.0 - {lexicon}) * (1.0 - {classifier})"


@dataclass
class ModelLexiconScorer:
    """The fallback scorer: the exported classifier, gated and calibrated, with the lexicon.

    toxicity = combine(lexicon score, classifier score if the text has a gate term else 0).

    In the clean stage one regular expression pass (:func:`prefilter_sql`) keeps the texts with
    any lexicon or gate term as a whole word; a text without one scores exactly 0 under both
    parts, so the prefilter cannot drop a positive. Of those, only the texts with a gate term
    are tokenised for the classifier (about 15 µs of CPU a text); the rest get the lexicon
    macro alone. (Gate terms are ASCII, so RE2's ASCII ``\\b`` is a word boundary wherever
    the tokenizer's Unicode runs of letters, digits and underscores begin or end.)
    """

    model: LinearTextModel
    lexicon: LexiconScorer
    calibration: Calibration

    def __post_init__(self) -> None:
        gate = self.gate_terms
        if not gate:
            raise ValueError(
                f"no vocabulary term reaches gate_weight {self.calibration.gate_weight}"
            )
        bad = [t for t in gate if not re.fullmatch(r"[a-z0-9_]+", t)]
        if bad:
            raise ValueError(f"gate terms must be ASCII word characters, got {bad[:5]}")

    @classmethod
    def bundled(cls) -> ModelLexiconScorer:
        return cls(LinearTextModel.load(), LexiconScorer.bundled(), Calibration.load())

    @property
    def name(self) -> str:
        return f"{self.lexicon.name}+{self.model.name}({self.calibration.tag})"

    @property
    def gate_terms(self) -> list[str]:
        mask = self.model.mean_weights >= self.calibration.gate_weight
        return [t for t, m in zip(self.model.terms, mask, strict=True) if m]

    def prefilter_pattern(self) -> str:
        """RE2: any lexicon or gate term as a whole word (:func:`prefilter_pattern`)."""
        return prefilter_pattern(sorted(set(self.lexicon.terms) | set(self.gate_terms)))

    def prefilter_sql(self, column: str) -> str:
        """Any lexicon or gate term as a whole word (:func:`prefilter_sql`)."""
        return f"regexp_matches({column}, {quote(self.prefilter_pattern())})"

    def install(self, con: duckdb.DuckDBPyConnection) -> None:
        """The lexicon macro and the vocabulary table ``_tox_vocab``."""
        self.lexicon.install(con)
        con.register("_tox_vocab_arrow", self.model.vocabulary_table())
        con.execute("CREATE OR REPLACE TEMP TABLE _tox_vocab AS SELECT * FROM _tox_vocab_arrow")
        con.unregister("_tox_vocab_arrow")

    def create_scores(self, con: duckdb.DuckDBPyConnection, source_sql: str, table: str) -> None:
        self.install(con)
        gate = prefilter_sql(self.gate_terms, "_text")
        con.execute(
            "CREATE OR REPLACE TEMP TABLE _tox_docs AS "
            f"SELECT row_number() OVER () AS _id, _text, {gate} AS _may_gate "
            f"FROM ({source_sql}) WHERE {self.prefilter_sql('_text')}"
        )
        # only texts with a gate term are tokenised: the classifier does not vote on the rest
        gated_docs = "(SELECT _id, _text FROM _tox_docs WHERE _may_gate)"
        classifier = self.calibration.classifier_score_sql("_p")
        score = self.calibration.combine_sql(
            "toxicity(_text)",
            f"CASE WHEN _max_weight >= {self.calibration.gate_weight!r} THEN {classifier} ELSE 0.0 END",
        )
        con.execute(f"""
        CREATE OR REPLACE TEMP TABLE {table} AS
        SELECT _text, _toxicity FROM (
            SELECT _text, {score} AS _toxicity
            FROM _tox_docs LEFT JOIN ({self.model.probability_sql(gated_docs, "_tox_vocab")})
                USING (_id)
        ) WHERE _toxicity > 0""")
        con.execute("DROP TABLE _tox_docs; DROP TABLE _tox_vocab")

    def parts(self, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per text, without prefilter or gate (what the calibration works on): the lexicon
        score, the classifier probability, and the largest mean fold weight among its
        vocabulary tokens (−inf without any; the text is gated at g when it is ≥ g)."""
        con = duckdb.connect()
        try:
            self.install(con)
            con.register("_texts_in", pa.table({"_text": pa.array(list(texts), pa.string())}))
            con.execute(
                "CREATE TEMP TABLE _docs AS "
                "SELECT row_number() OVER () - 1 AS _id, _text FROM _texts_in"
            )
            rows = con.execute(
                f"SELECT toxicity(_text), coalesce(_p, {self.model.prior()!r}), "
                f"coalesce(_max_weight, '-inf'::DOUBLE) FROM _docs LEFT JOIN "
                f"({self.model.probability_sql('_docs', '_tox_vocab')}) USING (_id) ORDER BY _id"
            ).fetchall()
        finally:
            con.close()
        if not rows:
            return np.zeros(0), np.zeros(0), np.zeros(0)
        lexicon, probability, max_weight = (
            np.array(c, np.float64) for c in zip(*rows, strict=True)
        )
        return lexicon, probability, max_weight

    def score(self, texts: Sequence[str | None]) -> np.ndarray:
        return _score_list(self, texts)


# -- Detoxify ---------------------------------------------------------------------------------


@dataclass
class DetoxifyScorer:
    """The Detoxify ``original`` model from a local checkpoint (the paper's scorer)."""

    checkpoint: str
    batch_size: int = 64
    name: str = "detoxify-original"

    def __post_init__(self) -> None:
        if not Path(self.checkpoint).is_file():
            raise FileNotFoundError(f"Detoxify checkpoint {self.checkpoint} does not exist")
        try:
            from detoxify import Detoxify  # optional dependency
        except ImportError as exc:
            raise RuntimeError(
                "IMAGEGEM_DETOXIFY_CHECKPOINT is set but the 'detoxify' package is not "
                "installed: pip install detoxify, or unset it to use the bundled fallback scorer"
            ) from exc
        # Detoxify loads its checkpoint with torch.load, which since torch 2.6 defaults to
        # weights_only=True: a restricted unpickler that refuses arbitrary objects.
        self._model = Detoxify("original", checkpoint=self.checkpoint, device="cpu")

    def score(self, texts: Sequence[str | None]) -> np.ndarray:
        out = np.zeros(len(texts), dtype=np.float64)
        for start in range(0, len(texts), self.batch_size):
            chunk = [t or "" for t in texts[start : start + self.batch_size]]
            out[start : start + len(chunk)] = self._model.predict(chunk)["toxicity"]
        return out


@functools.cache
def _bundled_scorer() -> ModelLexiconScorer:
    """The bundled fallback, parsed once per process (its model file has 15k rows)."""
    return ModelLexiconScorer.bundled()


def make_scorer(detoxify_checkpoint: str | None) -> ToxicityScorer:
    """Detoxify when a checkpoint is configured, else the bundled classifier + lexicon."""
    if detoxify_checkpoint:
        return DetoxifyScorer(detoxify_checkpoint)
    return _bundled_scorer()
