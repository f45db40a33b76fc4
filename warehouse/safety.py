"""Prompt toxicity scorers for the safety filter (paper: drop prompts whose toxicity > 0.2).

Two scorers behind one interface:

* :class:`DetoxifyScorer` — the paper's Detoxify model, used when a checkpoint path is
  configured (``IMAGEGEM_DETOXIFY_CHECKPOINT``); nothing is downloaded.
* :class:`LexiconScorer` — a transparent bundled lexicon (``sql/toxicity_lexicon.tsv``):
  toxicity = 1 − ∏(1 − weight) over the distinct lexicon terms found as whole words. It runs
  as one DuckDB macro, so the clean stage scores millions of prompts in SQL, and the same macro
  scores Python lists (one home for the rule).

Which scorer ran is recorded in the clean stage's metadata and in each quarantine reason.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

import duckdb
import numpy as np

from warehouse.duck import quote


class ToxicityScorer(Protocol):
    """Scores texts in [0, 1]; ``name`` says which scorer (and version) ran."""

    name: str

    def score(self, texts: Sequence[str | None]) -> np.ndarray: ...


def load_lexicon(path: Path | None = None) -> dict[str, float]:
    """The bundled lexicon, term → weight (weights in (0, 1])."""
    text = (
        path.read_text()
        if path
        else resources.files("warehouse").joinpath("sql/toxicity_lexicon.tsv").read_text()
    )
    terms: dict[str, float] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise ValueError(f"toxicity lexicon line {lineno}: expected 'term<TAB>weight'")
        term, weight = parts[0].strip().lower(), float(parts[1])
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"toxicity lexicon line {lineno}: weight {weight} not in (0, 1]")
        terms[term] = weight
    return terms


@dataclass
class LexiconScorer:
    """Whole-word lexicon scorer, evaluated as the DuckDB macro ``toxicity(text)``."""

    terms: dict[str, float]
    name: str = "lexicon-v1"

    @classmethod
    def bundled(cls) -> LexiconScorer:
        return cls(load_lexicon())

    def macro_sql(self) -> str:
        """``CREATE MACRO toxicity(p)`` for this lexicon."""
        alternation = "|".join(re.escape(t) for t in sorted(self.terms, key=len, reverse=True))
        pattern = quote(rf"\b({alternation})\b")
        weights = ", ".join(f"{quote(t)}: {w!r}" for t, w in sorted(self.terms.items()))
        return (
            "CREATE OR REPLACE MACRO toxicity(p) AS CASE WHEN p IS NULL THEN 0.0 ELSE "
            "1.0 - coalesce(list_aggregate(list_transform("
            f"list_distinct(regexp_extract_all(lower(p), {pattern}, 1)), "
            f"lambda t: 1.0 - map_extract_value(MAP {{{weights}}}, t)), 'product'), 1.0) END"
        )

    def prefilter_sql(self, column: str) -> str:
        """A cheap case-insensitive match of any term (no lower() copy), before scoring."""
        alternation = "|".join(re.escape(t) for t in sorted(self.terms, key=len, reverse=True))
        pattern = quote(rf"(?i)\b({alternation})\b")
        return f"regexp_matches({column}, {pattern})"

    def install(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute(self.macro_sql())

    def score(self, texts: Sequence[str | None]) -> np.ndarray:
        con = duckdb.connect()
        self.install(con)
        rows = con.execute(
            "SELECT toxicity(t) FROM unnest($texts) WITH ORDINALITY AS u(t, i) ORDER BY i",
            {"texts": list(texts)},
        ).fetchall()
        return np.array([r[0] for r in rows], dtype=np.float64)


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
                "installed: pip install detoxify, or unset it to use the bundled lexicon"
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


def make_scorer(detoxify_checkpoint: str | None) -> ToxicityScorer:
    """Detoxify when a checkpoint is configured, else the bundled lexicon."""
    if detoxify_checkpoint:
        return DetoxifyScorer(detoxify_checkpoint)
    return LexiconScorer.bundled()
