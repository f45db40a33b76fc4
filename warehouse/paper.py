"""The ImageGem paper's published figures: the one home of every number quoted from it.

``warehouse.stats`` shows them beside Table 1 computed on the lake; the sample generator
(``pipelines/sample``) sizes its world from them; tests compare shape ratios against them.
"""

from __future__ import annotations

# Table 1: the dataset before ("raw") and after ("filtered") the safety filter.
PAPER_TABLE1: dict[str, dict[str, int]] = {
    "raw": {
        "images": 5_658_107,
        "unique_prompts": 2_975_943,
        "loras": 242_889,
        "unique_tags": 105_788,
        "users": 57_245,
        "uploaders": 19_003,
    },
    "filtered": {
        "images": 4_916_134,
        "unique_prompts": 2_895_364,
        "loras": 242_118,
        "unique_tags": 97_434,
        "users": 57_245,
        "uploaders": 18_889,
    },
}

# The shape ratios of the published release (after the safety filter).
PAPER_RATIOS: dict[str, float] = {
    "users_per_uploader": 3.03,
    "loras_per_uploader": 12.8,
    "images_per_user": 85.9,
    "unique_prompts_per_image": 0.589,
    "unique_tags_per_lora": 0.40,
    "safety_removed_share": 0.131,
}
