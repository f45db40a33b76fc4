"""Small hand-made release tables for tests (built by code, no checked-in blobs)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from warehouse.schema import IMAGES, MODELS, ReleaseTable


def user_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def model_row(version_id: int, **overrides) -> dict:
    row = {
        "modelId": version_id // 10,
        "modelName": f"Model {version_id}",
        "modelVersionId": version_id,
        "modelVersionName": "v1.0",
        "fileId": version_id * 10,
        "fileName": f"lora_{version_id}.safetensors",
        "modelDescription": "<p>desc</p>",
        "allowNoCredit": 1,
        "allowCommercialUse": "Image, RentCivit",
        "allowDerivatives": 1,
        "allowDifferentLicense": 1,
        "modelType": "LORA",
        "minor": 0,
        "poi": 0,
        "modelNsfwLevel": 1,
        "cosmetic": None,
        "tags": "anime, style",
        "publishedAt": "2023-05-01 10:00:00",
        "baseModel": "SD 1.5",
        "baseModelType": "Standard",
        "availability": "Public",
        "modelVersionNsfwLevel": 1,
        "modelVersionDescription": None,
        "trainedWords": "trigger",
        "sizeKB": 1024.5,
        "fileType": "Model",
        "fp": "fp16",
        "format": "SafeTensor",
        "pickleScanResult": "Success",
        "pickleScanMessage": "No Pickle imports",
        "virusScanResult": "Success",
        "scannedAt": "2023-05-01 10:05:00",
        "hashAutoV1": "ABCDEF01",
        "hashAutoV2": "0123456789",
        "hashSHA256": "0123456789" + "A" * 54,
        "hashCRC32": "DEADBEEF",
        "hashBLAKE3": "B" * 64,
        "downloadUrl": f"https://civitai.com/api/download/models/{version_id}",
        "primary": 1,
        "downloadCount": 10,
        "ratingCount": 2,
        "rating": 4.5,
        "thumbsUpCount": 3,
        "thumbsDownCount": 0,
        "userHash": user_hash("uploader"),
    }
    row.update(overrides)
    return row


def image_row(image_id: int, version_id: int = 1, **overrides) -> dict:
    row = {
        "imageId": image_id,
        "modelVersionId": version_id,
        "postId": image_id * 7,
        "url": f"https://image.civitai.com/x/{image_id}.jpeg",
        "hash": "U5ABCDEF",
        "nsfw": 0,
        "browsingLevel": 1,
        "type": "image",
        "height": 768,
        "width": 512,
        "seed": 1234,
        "steps": 30,
        "prompt": f"a dog in a park, (masterpiece:1.2) <lora:lora_{version_id}:0.8> #{image_id}",
        "negativePrompt": "blurry",
        "sampler": "Euler a",
        "cfgScale": 7.0,
        "clipSkip": 2,
        "hiresUpscale": None,
        "hiresUpscaler": None,
        "denoisingStrength": None,
        "createdAt": "2023-06-01 12:00:00",
        "comfy": None,
        "cryCount": 0,
        "laughCount": 0,
        "likeCount": 5,
        "dislikeCount": 0,
        "heartCount": 1,
        "commentCount": 0,
        "userHash": user_hash("creator"),
    }
    row.update(overrides)
    return row


def to_table(rows: list[dict], table: ReleaseTable) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=table.canonical_schema())


def write_release(root: Path, images: list[dict], models: list[dict]) -> Path:
    """A release folder with images/part-0.parquet and models/part-0.parquet."""
    for name, rows, table in (("images", images, IMAGES), ("models", models, MODELS)):
        (root / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(to_table(rows, table), root / name / "part-0.parquet")
    return root
