"""Civitai API v1 pages → ImageGem release rows (pure functions: no network, no Dagster).

The crawler lands every API page verbatim; this module turns a landed page into rows of the
release tables (``warehouse.schema.IMAGES`` / ``MODELS``, canonical Arrow schemas) and
quarantine records:

* ``/api/v1/models`` items → one ``models`` row per (model version × file);
* ``/api/v1/images?modelVersionId=V`` items → one ``images`` row per image, with
  ``modelVersionId`` = V (the version being crawled);
* ``/api/v1/model-versions/{id}`` objects → ``models`` rows whose model-level columns are
  unknown (null), used only where no ``/models`` item carries the version.

Every representation seen in the wild is accepted: ``allowCommercialUse`` as a string, an
array, an empty array or a Postgres literal (``"{Image,Rent}"``); ``primary`` true or absent;
image ``nsfwLevel`` as an int or a legacy name; ``meta`` flat or nested ``{"id", "meta"}``;
A1111 meta keys (``"Clip skip": "2"``) next to camelCase ones; timestamps with or without
``Z``. Timestamps become text ``YYYY-MM-DD HH:MM:SS`` (UTC); text that is no timestamp is kept
verbatim, so the clean stage judges it with the same rules as release files. User names are
kept as the API gives them (the pipeline hashes raw names later).

Nothing is dropped silently and nothing raises: an item that cannot be mapped becomes a
:class:`warehouse.quarantine.QuarantineRecord` (source ``civitai``, step ``crawl``, the table,
a ``col=value/...`` key, the reason, the landed file and line, the item as JSON text); a page
whose body is no JSON object (HTML error page, truncated body, ...) becomes one record with
table ``page``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from warehouse.quarantine import QuarantineRecord, payload_text
from warehouse.schema import IMAGES, MODELS, RELEASE_TIMESTAMP_FORMAT, ReleaseTable

SOURCE = "civitai"  # quarantine source and step of everything mapped here
STEP = "crawl"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Legacy image nsfwLevel names → browsingLevel bitmask (Civitai's API: None=1, Soft=3, ...).
LEGACY_NSFW_LEVELS: dict[str, int] = {"None": 1, "Soft": 3, "Mature": 7, "X": 31}
HASH_KINDS: tuple[str, ...] = ("AutoV1", "AutoV2", "SHA256", "CRC32", "BLAKE3")

Row = dict[str, Any]


class MapError(ValueError):
    """A value that cannot be mapped to its release column."""


@dataclass
class Mapped:
    """Rows of one release table and the quarantine records produced while mapping."""

    rows: list[Row] = field(default_factory=list)
    quarantine: list[QuarantineRecord] = field(default_factory=list)

    def extend(self, other: Mapped) -> None:
        self.rows.extend(other.rows)
        self.quarantine.extend(other.quarantine)


# ---------------------------------------------------------------------------------------------
# Scalars


def record_key(**columns: Any) -> str:
    """The quarantine key ``col=value/...`` of the given key columns (None → ``NULL``)."""
    return "/".join(f"{k}={'NULL' if v is None else v}" for k, v in columns.items())


def quarantine_record(
    table: str,
    key: str,
    reason: str,
    payload: Any,
    source_file: str | None = None,
    source_row: int | None = None,
) -> QuarantineRecord:
    """A crawl quarantine record: which table and key, why, where it was landed, the payload."""
    return QuarantineRecord(
        source=SOURCE,
        step=STEP,
        table_name=table,
        record_key=key,
        reason=reason,
        source_file=source_file,
        source_row=source_row,
        payload=payload_text(payload),
    )


def to_int(value: Any, name: str) -> int | None:
    """An int64 from an int, a whole float, a bool or numeric text; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        result = value
    elif isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise MapError(f"{name}: {value!r} is not a whole number")
        result = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if text == "":
            return None
        try:
            result = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise MapError(f"{name}: {value!r} is not a number") from None
            if not math.isfinite(number) or not number.is_integer():
                raise MapError(f"{name}: {value!r} is not a whole number") from None
            result = int(number)
    else:
        raise MapError(f"{name}: {type(value).__name__} is not a number")
    if not INT64_MIN <= result <= INT64_MAX:
        raise MapError(f"{name}: {value!r} is out of the int64 range")
    return result


def to_float(value: Any, name: str) -> float | None:
    """A float from a number or numeric text; None (and empty text) stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return None
        try:
            return float(text)
        except ValueError:
            raise MapError(f"{name}: {value!r} is not a number") from None
    raise MapError(f"{name}: {type(value).__name__} is not a number")


def to_flag(value: Any, name: str) -> int | None:
    """0/1 from a bool, 0/1 or "true"/"false"; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "0", "1"):
        return int(value.strip().lower() in ("true", "1"))
    raise MapError(f"{name}: {value!r} is not a boolean")


def to_text(value: Any, name: str) -> str | None:
    """Text from a string or a number; objects and arrays become JSON text."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    raise MapError(f"{name}: {type(value).__name__} is not text")


def timestamp_text(value: Any) -> str | None:
    """Release timestamp text ``YYYY-MM-DD HH:MM:SS`` (UTC) from any API timestamp.

    ISO 8601 with or without ``Z``/offset/fraction, a date, or epoch seconds/milliseconds.
    Text that is no timestamp is returned unchanged (the clean stage quarantines it).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float):
        seconds = value / 1000 if abs(value) > 1e11 else value
        try:
            return datetime.fromtimestamp(seconds, UTC).strftime(RELEASE_TIMESTAMP_FORMAT)
        except (OverflowError, OSError, ValueError):
            return str(value)
    text = str(value).strip()
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return str(value)
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed.strftime(RELEASE_TIMESTAMP_FORMAT)


def parse_timestamp(value: Any) -> datetime | None:
    """A naive UTC datetime from an API timestamp, or None when it is no timestamp."""
    text = timestamp_text(value)
    if text is None:
        return None
    try:
        return datetime.strptime(text, RELEASE_TIMESTAMP_FORMAT)
    except ValueError:
        return None


def join_list(value: Any, name: str, key: str = "name") -> str | None:
    """ ", "-joined text from an array (of strings or ``{name}`` objects); text stays text."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts: list[str] = []
        for element in value:
            if isinstance(element, dict):
                element = element.get(key)
            if element is None:
                continue
            if not isinstance(element, str | int | float) or isinstance(element, bool):
                raise MapError(f"{name}: element {element!r} is not text")
            parts.append(str(element))
        return ", ".join(parts) if parts else None
    raise MapError(f"{name}: {type(value).__name__} is not a list")


def commercial_use(value: Any) -> str | None:
    """Canonical ``allowCommercialUse``: ", "-joined; [] / "{}" / "" → None.

    Accepts "Image, Rent", ["Image", "Rent"], [] and the Postgres literal "{Image,Rent}".
    """
    if value is None:
        return None
    if isinstance(value, list):
        parts = [str(v).strip() for v in value if v is not None and str(v).strip()]
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("{") and text.endswith("}"):
            text = text[1:-1]
        parts = [p.strip().strip('"').strip() for p in text.split(",")]
        parts = [p for p in parts if p]
    else:
        raise MapError(f"allowCommercialUse: {value!r} is neither text nor a list")
    return ", ".join(parts) if parts else None


def browsing_level(item: Mapping[str, Any]) -> int | None:
    """The image's browsingLevel: the int field, else an int nsfwLevel, else a legacy name."""
    level = item.get("browsingLevel")
    if level is not None:
        return to_int(level, "browsingLevel")
    nsfw_level = item.get("nsfwLevel")
    if nsfw_level is None:
        return None
    if isinstance(nsfw_level, str) and nsfw_level.strip() in LEGACY_NSFW_LEVELS:
        return LEGACY_NSFW_LEVELS[nsfw_level.strip()]
    return to_int(nsfw_level, "nsfwLevel")


def _first(mapping: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        value = mapping.get(name)
        if value is not None:
            return value
    return None


def _dict(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MapError(f"{name}: {type(value).__name__} is not an object")
    return value


def _list(value: Any, name: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise MapError(f"{name}: {type(value).__name__} is not an array")
    return value


# ---------------------------------------------------------------------------------------------
# Pages


def parse_page(body: str | bytes | None) -> tuple[dict[str, Any] | None, str | None]:
    """The JSON object of a page body, or (None, reason) for HTML, truncated or other bodies."""
    if body is None:
        return None, "no body"
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="replace")
    text = body.strip()
    if not text:
        return None, "empty body"
    if text.startswith("<"):
        title = re.search(r"<title>(.*?)</title>", text, re.I | re.S)
        detail = f": {title.group(1).strip()[:100]}" if title else ""
        return None, f"HTML page instead of JSON{detail}"
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        truncated = exc.pos >= len(text) - 1
        kind = "truncated JSON body" if truncated else "invalid JSON body"
        return None, f"{kind} ({exc.msg} at char {exc.pos} of {len(text)})"
    if not isinstance(payload, dict):
        return None, f"JSON body is a {type(payload).__name__}, not an object"
    return payload, None


def page_items(payload: Mapping[str, Any]) -> tuple[list[Any] | None, str | None]:
    """The ``items`` array of a list page, or (None, reason)."""
    items = payload.get("items")
    if not isinstance(items, list):
        if "error" in payload or "message" in payload:
            message = _first(payload, "error", "message")
            return None, f"error body: {payload_text(message, 200)}"
        return None, "page has no items array"
    return items, None


def next_cursor(payload: Mapping[str, Any]) -> str | None:
    """The opaque ``metadata.nextCursor`` as text, or None at the end."""
    metadata = payload.get("metadata")
    if not isinstance(metadata, dict):
        return None
    cursor = metadata.get("nextCursor")
    if cursor is None or cursor == "":
        return None
    return str(cursor)


# ---------------------------------------------------------------------------------------------
# Models


def _hashes(value: Any) -> dict[str, str | None]:
    """Hash kind → uppercase hex from ``{"SHA256": ...}`` or ``[{"type", "hash"}]``."""
    out: dict[str, str | None] = dict.fromkeys(HASH_KINDS)
    if value is None:
        return out
    pairs: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        pairs = value.items()
    elif isinstance(value, list):
        pairs = [(h.get("type"), h.get("hash")) for h in value if isinstance(h, dict)]
    else:
        raise MapError(f"hashes: {type(value).__name__} is not an object")
    lookup = {k.lower(): k for k in HASH_KINDS}
    for kind, digest in pairs:
        name = lookup.get(str(kind).lower())
        if name is not None and digest is not None:
            out[name] = str(digest).upper()
    return out


def _stats(version: Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, Any]:
    """Per-version stats when the version carries them, else the model's."""
    stats = version.get("stats")
    if not isinstance(stats, dict):
        stats = model.get("stats")
    return _dict(stats, "stats")


def _file_rows(
    model: Mapping[str, Any], version: Mapping[str, Any], *, model_level: bool
) -> list[Row]:
    """Release rows of one version's files (raises MapError on any unmappable value)."""
    version_id = to_int(version.get("id"), "modelVersions.id")
    if version_id is None:
        raise MapError("model version without id")
    model_id = to_int(_first(model, "id") if model_level else version.get("modelId"), "modelId")
    if model_id is None:
        model_id = to_int(version.get("modelId"), "modelId")
    stats = _stats(version, model)
    creator = _dict(model.get("creator"), "creator")
    common: Row = {
        "modelId": model_id,
        "modelName": to_text(model.get("name"), "name"),
        "modelVersionId": version_id,
        "modelVersionName": to_text(version.get("name"), "modelVersions.name"),
        "modelDescription": to_text(model.get("description"), "description"),
        "allowNoCredit": to_flag(model.get("allowNoCredit"), "allowNoCredit"),
        "allowCommercialUse": commercial_use(model.get("allowCommercialUse")),
        "allowDerivatives": to_flag(model.get("allowDerivatives"), "allowDerivatives"),
        "allowDifferentLicense": to_flag(
            model.get("allowDifferentLicense"), "allowDifferentLicense"
        ),
        "modelType": to_text(model.get("type"), "type"),
        "minor": to_flag(model.get("minor"), "minor"),
        "poi": to_flag(model.get("poi"), "poi"),
        "modelNsfwLevel": to_int(model.get("nsfwLevel"), "nsfwLevel") if model_level else None,
        "cosmetic": to_text(model.get("cosmetic"), "cosmetic"),
        "tags": join_list(model.get("tags"), "tags"),
        "publishedAt": timestamp_text(version.get("publishedAt")),
        "baseModel": to_text(version.get("baseModel"), "baseModel"),
        "baseModelType": to_text(version.get("baseModelType"), "baseModelType"),
        "availability": to_text(
            _first(version, "availability") or model.get("availability"), "availability"
        ),
        "modelVersionNsfwLevel": to_int(version.get("nsfwLevel"), "modelVersions.nsfwLevel"),
        "modelVersionDescription": to_text(version.get("description"), "modelVersions.desc"),
        "trainedWords": join_list(version.get("trainedWords"), "trainedWords"),
        "downloadCount": to_int(stats.get("downloadCount"), "downloadCount"),
        "ratingCount": to_int(stats.get("ratingCount"), "ratingCount"),
        "rating": to_float(stats.get("rating"), "rating"),
        "thumbsUpCount": to_int(stats.get("thumbsUpCount"), "thumbsUpCount"),
        "thumbsDownCount": to_int(stats.get("thumbsDownCount"), "thumbsDownCount"),
        "userHash": to_text(creator.get("username"), "creator.username"),
    }
    rows: list[Row] = []
    for file in _list(version.get("files"), "files"):
        file = _dict(file, "files[]")
        file_id = to_int(file.get("id"), "files.id")
        if file_id is None:
            raise MapError(f"version {version_id}: a file without id")
        metadata = _dict(file.get("metadata"), "files.metadata")
        hashes = _hashes(file.get("hashes"))
        row = dict(common)
        row.update(
            {
                "fileId": file_id,
                "fileName": to_text(file.get("name"), "files.name"),
                "sizeKB": to_float(file.get("sizeKB"), "files.sizeKB"),
                "fileType": to_text(file.get("type"), "files.type"),
                "fp": to_text(metadata.get("fp"), "files.metadata.fp"),
                "format": to_text(metadata.get("format"), "files.metadata.format"),
                "pickleScanResult": to_text(file.get("pickleScanResult"), "pickleScanResult"),
                "pickleScanMessage": to_text(file.get("pickleScanMessage"), "pickleScanMessage"),
                "virusScanResult": to_text(file.get("virusScanResult"), "virusScanResult"),
                "scannedAt": timestamp_text(file.get("scannedAt")),
                "hashAutoV1": hashes["AutoV1"],
                "hashAutoV2": hashes["AutoV2"],
                "hashSHA256": hashes["SHA256"],
                "hashCRC32": hashes["CRC32"],
                "hashBLAKE3": hashes["BLAKE3"],
                "downloadUrl": to_text(
                    file.get("downloadUrl") or version.get("downloadUrl"), "downloadUrl"
                ),
                "primary": 1 if to_flag(file.get("primary"), "files.primary") == 1 else 0,
            }
        )
        rows.append(row)
    return rows


def map_model_item(item: Any, source_file: str | None, source_row: int | None = None) -> Mapped:
    """Release ``models`` rows of one ``/models`` item (one per version × file).

    A version that cannot be mapped, or has no files, is quarantined on its own; the model's
    other versions are kept. ``source_file``/``source_row``: where the item was landed.
    """
    out = Mapped()
    where = (source_file, source_row)
    if not isinstance(item, dict):
        out.quarantine.append(
            quarantine_record("models", "", "model item is not an object", item, *where)
        )
        return out
    model_id = item.get("id")
    model_key = record_key(modelId=model_id)
    try:
        if to_int(model_id, "id") is None:
            raise MapError("model item without id")
        versions = _list(item.get("modelVersions"), "modelVersions")
    except MapError as exc:
        out.quarantine.append(quarantine_record("models", model_key, str(exc), item, *where))
        return out
    if not versions:
        out.quarantine.append(
            quarantine_record("models", model_key, "model has no versions", item, *where)
        )
    for version in versions:
        version_id = version.get("id") if isinstance(version, dict) else None
        key = record_key(modelId=model_id, modelVersionId=version_id)
        try:
            version = _dict(version, "modelVersions[]")
            rows = _file_rows(item, version, model_level=True)
        except MapError as exc:
            out.quarantine.append(quarantine_record("models", key, str(exc), version, *where))
            continue
        if not rows:
            out.quarantine.append(
                quarantine_record("models", key, "model version has no files", version, *where)
            )
        out.rows.extend(rows)
    return out


def map_models_page(
    payload: Mapping[str, Any], source_file: str | None, source_row: int | None = None
) -> Mapped:
    """Release ``models`` rows and quarantine records of one ``/api/v1/models`` page."""
    items, reason = page_items(payload)
    if items is None:
        record = quarantine_record("page", "", reason or "", payload, source_file, source_row)
        return Mapped(quarantine=[record])
    out = Mapped()
    for item in items:
        out.extend(map_model_item(item, source_file, source_row))
    return out


def map_model_version(
    payload: Mapping[str, Any], source_file: str | None, source_row: int | None = None
) -> Mapped:
    """Release ``models`` rows of one ``/api/v1/model-versions/{id}`` object.

    Only the nested ``model{name, type, nsfw, poi}`` is known of the model: the other
    model-level columns (description, licence flags, tags, uploader) stay null. Versions of
    other types than LORA are quarantined as out of scope.
    """
    out = Mapped()
    where = (source_file, source_row)
    key = record_key(modelVersionId=payload.get("id"))
    try:
        model = dict(_dict(payload.get("model"), "model"))
        model_type = model.get("type")
        if model_type is not None and str(model_type).upper() != "LORA":
            raise MapError(f"model type {model_type!r} is not LORA")
        model.setdefault("id", payload.get("modelId"))
        model.pop("nsfwLevel", None)  # the model's own level is not given here
        rows = _file_rows(model, payload, model_level=False)
    except MapError as exc:
        out.quarantine.append(quarantine_record("models", key, str(exc), payload, *where))
        return out
    if not rows:
        out.quarantine.append(
            quarantine_record("models", key, "model version has no files", payload, *where)
        )
    out.rows.extend(rows)
    return out


def model_sort_key(item: Any) -> tuple[datetime, int] | None:
    """(latest version publishedAt, model id) of a ``/models`` item: its Newest-first key."""
    if not isinstance(item, dict):
        return None
    try:
        model_id = to_int(item.get("id"), "id")
    except MapError:
        return None
    if model_id is None:
        return None
    dates = []
    for version in item.get("modelVersions") or []:
        if isinstance(version, dict):
            stamp = parse_timestamp(version.get("publishedAt"))
            if stamp is not None:
                dates.append(stamp)
    return (max(dates) if dates else datetime(1970, 1, 1), model_id)


def model_version_ids(item: Any) -> list[int]:
    """The version ids of a ``/models`` item (unmappable ones skipped)."""
    ids: list[int] = []
    if isinstance(item, dict):
        for version in item.get("modelVersions") or []:
            if isinstance(version, dict):
                try:
                    version_id = to_int(version.get("id"), "id")
                except MapError:
                    continue
                if version_id is not None:
                    ids.append(version_id)
    return ids


# ---------------------------------------------------------------------------------------------
# Images


def image_meta(item: Mapping[str, Any]) -> dict[str, Any]:
    """The image's generation metadata, flat (unwraps the nested ``{"id", "meta"}`` form)."""
    meta = item.get("meta")
    if not isinstance(meta, dict):
        return {}
    inner = meta.get("meta")
    if isinstance(inner, dict) and set(meta) <= {"id", "meta"}:
        return inner
    if inner is None and set(meta) <= {"id", "meta"}:
        return {}
    return meta


# release column → (meta keys in order of preference, converter)
_META_FIELDS: dict[str, tuple[tuple[str, ...], Callable[[Any, str], Any]]] = {
    "seed": (("seed", "Seed"), to_int),
    "steps": (("steps", "Steps"), to_int),
    "prompt": (("prompt",), to_text),
    "negativePrompt": (("negativePrompt", "Negative prompt"), to_text),
    "sampler": (("sampler", "Sampler"), to_text),
    "cfgScale": (("cfgScale", "CFG scale"), to_float),
    "clipSkip": (("clipSkip", "Clip skip"), to_int),
    "hiresUpscale": (("hiresUpscale", "Hires upscale"), to_float),
    "hiresUpscaler": (("hiresUpscaler", "Hires upscaler"), to_text),
    "denoisingStrength": (("denoisingStrength", "Denoising strength", "denoise"), to_float),
    "comfy": (("comfy",), to_text),
}


def lora_resources(item: Mapping[str, Any]) -> list[int]:
    """modelVersionIds of the LoRAs an image item lists in ``meta.civitaiResources``."""
    ids: list[int] = []
    for resource in image_meta(item).get("civitaiResources") or []:
        if not isinstance(resource, dict):
            continue
        kind = str(resource.get("type") or "").lower()
        if kind not in ("lora", "locon", "dora", "lycoris"):
            continue
        try:
            version_id = to_int(resource.get("modelVersionId"), "modelVersionId")
        except MapError:
            continue
        if version_id is not None:
            ids.append(version_id)
    return ids


def map_image_item(
    item: Any, model_version_id: int, source_file: str | None, source_row: int | None = None
) -> Mapped:
    """The release ``images`` row of one ``/images`` item crawled for ``model_version_id``.

    Unparseable generation metadata (user-supplied text) nulls that column and adds a
    quarantine record; any other unmappable value quarantines the item.
    """
    out = Mapped()
    where = (source_file, source_row)
    if not isinstance(item, dict):
        key = record_key(imageId=None, modelVersionId=model_version_id)
        out.quarantine.append(
            quarantine_record("images", key, "image item is not an object", item, *where)
        )
        return out
    image_id = item.get("id")
    key = record_key(imageId=image_id, modelVersionId=model_version_id)
    try:
        if to_int(image_id, "id") is None:
            raise MapError("image item without id")
        stats = _dict(item.get("stats"), "stats")
        level = browsing_level(item)
        nsfw = item.get("nsfw")
        if isinstance(nsfw, str) and nsfw.strip() in LEGACY_NSFW_LEVELS:
            nsfw_flag = int(nsfw.strip() != "None")
        elif nsfw is None and level is not None:
            nsfw_flag = int(level >= 4)
        else:
            nsfw_flag = to_flag(nsfw, "nsfw")
        row: Row = {
            "imageId": to_int(image_id, "id"),
            "modelVersionId": int(model_version_id),
            "postId": to_int(item.get("postId"), "postId"),
            "url": to_text(item.get("url"), "url"),
            "hash": to_text(item.get("hash"), "hash"),
            "nsfw": nsfw_flag,
            "browsingLevel": level,
            "type": to_text(item.get("type"), "type"),
            "height": to_int(item.get("height"), "height"),
            "width": to_int(item.get("width"), "width"),
            "createdAt": timestamp_text(item.get("createdAt")),
            "cryCount": to_int(stats.get("cryCount"), "cryCount"),
            "laughCount": to_int(stats.get("laughCount"), "laughCount"),
            "likeCount": to_int(stats.get("likeCount"), "likeCount"),
            "dislikeCount": to_int(stats.get("dislikeCount"), "dislikeCount"),
            "heartCount": to_int(stats.get("heartCount"), "heartCount"),
            "commentCount": to_int(stats.get("commentCount"), "commentCount"),
            "userHash": to_text(item.get("username"), "username"),
        }
        meta = image_meta(item)
    except MapError as exc:
        out.quarantine.append(quarantine_record("images", key, str(exc), item, *where))
        return out
    for column, (names, convert) in _META_FIELDS.items():
        raw = _first(meta, *names)
        try:
            row[column] = convert(raw, column)
        except MapError as exc:
            row[column] = None
            out.quarantine.append(
                quarantine_record(
                    "images", key, f"meta field unparseable, set to null: {exc}", raw, *where
                )
            )
    out.rows.append({name: row.get(name) for name in IMAGES.column_names})
    return out


def map_images_page(
    payload: Mapping[str, Any],
    model_version_id: int,
    source_file: str | None,
    source_row: int | None = None,
) -> Mapped:
    """Release ``images`` rows and quarantine records of one ``/api/v1/images`` page."""
    items, reason = page_items(payload)
    if items is None:
        record = quarantine_record("page", "", reason or "", payload, source_file, source_row)
        return Mapped(quarantine=[record])
    out = Mapped()
    for item in items:
        out.extend(map_image_item(item, model_version_id, source_file, source_row))
    return out


# ---------------------------------------------------------------------------------------------
# Arrow


def release_table(rows: list[Row], table: ReleaseTable) -> pa.Table:
    """Rows as an Arrow table with exactly ``table.canonical_schema()``."""
    schema = table.canonical_schema()
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.table(
        {name: pa.array(columns[name], type=schema.field(name).type) for name in schema.names},
        schema=schema,
    )


def models_table(rows: list[Row]) -> pa.Table:
    """``models`` rows as Arrow (``MODELS.canonical_schema()``)."""
    return release_table(rows, MODELS)


def images_table(rows: list[Row]) -> pa.Table:
    """``images`` rows as Arrow (``IMAGES.canonical_schema()``)."""
    return release_table(rows, IMAGES)
