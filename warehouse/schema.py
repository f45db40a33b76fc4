"""Table schemas: the ImageGem release format and the warehouse's own tables.

The release tables (`images`, 29 columns; `models`, 45 columns) keep ImageGem's camelCase
names. Each release column has a *kind* that says which physical types a reader accepts for it
(files in the wild carry int32 ids, float64 counts after a pandas round trip, timestamps as
text or as timestamp) and one *canonical* Arrow type that the raw landing stores.

The clean warehouse tables keep the same names with stronger types (timestamps as
TIMESTAMP); the normalised tables use snake_case.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import pyarrow as pa


class Kind(Enum):
    """What a release column holds, independent of the physical type it arrives in."""

    INT = "int"  # any integer width; float holding whole numbers / NaN (pandas round trip)
    FLOAT = "float"  # any float or integer
    STRING = "string"  # utf8 / large_utf8
    TIMESTAMP_TEXT = "timestamp_text"  # "YYYY-MM-DD HH:MM:SS" text, or a timestamp / date


CANONICAL: dict[Kind, pa.DataType] = {
    Kind.INT: pa.int64(),
    Kind.FLOAT: pa.float64(),
    Kind.STRING: pa.string(),
    Kind.TIMESTAMP_TEXT: pa.string(),
}

# The clean tables store timestamps as timestamps.
CLEAN: dict[Kind, pa.DataType] = {**CANONICAL, Kind.TIMESTAMP_TEXT: pa.timestamp("us")}


@dataclass(frozen=True)
class ReleaseTable:
    """One table of the ImageGem release: its name, key and ordered (column, kind) pairs."""

    name: str
    key: tuple[str, ...]
    columns: tuple[tuple[str, Kind], ...]

    @property
    def column_names(self) -> list[str]:
        return [c for c, _ in self.columns]

    def kind(self, column: str) -> Kind:
        return dict(self.columns)[column]

    def canonical_schema(self) -> pa.Schema:
        """Arrow schema of a release file as the raw landing stores it (text timestamps)."""
        return pa.schema([pa.field(c, CANONICAL[k]) for c, k in self.columns])

    def clean_schema(self) -> pa.Schema:
        """Arrow schema of the clean warehouse table of the same name."""
        return pa.schema([pa.field(c, CLEAN[k]) for c, k in self.columns])


INT, FLT, STR, TS = Kind.INT, Kind.FLOAT, Kind.STRING, Kind.TIMESTAMP_TEXT

IMAGES = ReleaseTable(
    name="images",
    key=("imageId", "modelVersionId"),
    columns=(
        ("imageId", INT),
        ("modelVersionId", INT),
        ("postId", INT),
        ("url", STR),
        ("hash", STR),
        ("nsfw", INT),
        ("browsingLevel", INT),
        ("type", STR),
        ("height", INT),
        ("width", INT),
        ("seed", INT),
        ("steps", INT),
        ("prompt", STR),
        ("negativePrompt", STR),
        ("sampler", STR),
        ("cfgScale", FLT),
        ("clipSkip", INT),
        ("hiresUpscale", FLT),
        ("hiresUpscaler", STR),
        ("denoisingStrength", FLT),
        ("createdAt", TS),
        ("comfy", STR),
        ("cryCount", INT),
        ("laughCount", INT),
        ("likeCount", INT),
        ("dislikeCount", INT),
        ("heartCount", INT),
        ("commentCount", INT),
        ("userHash", STR),
    ),
)

MODELS = ReleaseTable(
    name="models",
    key=("modelVersionId", "fileId"),
    columns=(
        ("modelId", INT),
        ("modelName", STR),
        ("modelVersionId", INT),
        ("modelVersionName", STR),
        ("fileId", INT),
        ("fileName", STR),
        ("modelDescription", STR),
        ("allowNoCredit", INT),
        ("allowCommercialUse", STR),
        ("allowDerivatives", INT),
        ("allowDifferentLicense", INT),
        ("modelType", STR),
        ("minor", INT),
        ("poi", INT),
        ("modelNsfwLevel", INT),
        ("cosmetic", STR),
        ("tags", STR),
        ("publishedAt", TS),
        ("baseModel", STR),
        ("baseModelType", STR),
        ("availability", STR),
        ("modelVersionNsfwLevel", INT),
        ("modelVersionDescription", STR),
        ("trainedWords", STR),
        ("sizeKB", FLT),
        ("fileType", STR),
        ("fp", STR),
        ("format", STR),
        ("pickleScanResult", STR),
        ("pickleScanMessage", STR),
        ("virusScanResult", STR),
        ("scannedAt", TS),
        ("hashAutoV1", STR),
        ("hashAutoV2", STR),
        ("hashSHA256", STR),
        ("hashCRC32", STR),
        ("hashBLAKE3", STR),
        ("downloadUrl", STR),
        ("primary", INT),
        ("downloadCount", INT),
        ("ratingCount", INT),
        ("rating", FLT),
        ("thumbsUpCount", INT),
        ("thumbsDownCount", INT),
        ("userHash", STR),
    ),
)

RELEASE_TABLES: dict[str, ReleaseTable] = {t.name: t for t in (IMAGES, MODELS)}

# Lineage columns the raw landing adds to every release row (dropped by the clean stage).
SOURCE_FILE = "_source_file"
SOURCE_ROW = "_source_row"
INGEST_ERROR = "_ingest_error"
LINEAGE_FIELDS: tuple[pa.Field, ...] = (
    pa.field(SOURCE_FILE, pa.string()),
    pa.field(SOURCE_ROW, pa.int64()),
    pa.field(INGEST_ERROR, pa.string()),
)


def raw_landing_schema(table: ReleaseTable) -> pa.Schema:
    """Schema of the raw landing: canonical release columns plus lineage columns."""
    return pa.schema(list(table.canonical_schema()) + list(LINEAGE_FIELDS))


# browsingLevel / nsfwLevel bit flags (Civitai).
BROWSING_LEVELS: dict[str, int] = {"PG": 1, "PG13": 2, "R": 4, "X": 8, "XXX": 16, "Blocked": 32}

# A userHash: 64 lowercase hex characters (SHA-256). Anchored, for regexp_full_match and re.
USER_HASH_PATTERN = "^[0-9a-f]{64}$"

# The release's timestamp text ("createdAt", "publishedAt", ...): UTC wall time, whole seconds.
# DuckDB's strptime uses the same codes.
RELEASE_TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"

# Civitai's site (API, downloads) and the CDN that serves its image URLs.
CIVITAI_SITE = "https://civitai.com"
CIVITAI_IMAGE_CDN = "https://image.civitai.com"

# Every table of the warehouse that carries a user identifier, and the column that holds it.
USER_HASH_COLUMNS: dict[str, str] = {
    "images": "userHash",
    "models": "userHash",
    "users": "userHash",
    "loras": "userHash",
    "interactions": "userHash",
}
