"""The preferences stage: which generated images people preferred, learned from reactions.

* :mod:`ml.preferences.engagement` — reactions normalised by the uploader's audience and the
  image's age, and preference pairs (same prompt cluster, engagement apart by a margin) with a
  held-out split that shares no image with training.
* :mod:`ml.preferences.reward` — a Bradley–Terry preference head on frozen (image, prompt)
  embeddings, trained on those pairs; saved as safetensors + JSON.
* :mod:`ml.preferences.scorers` — one interface over the scorers the stage can run: HPSv2
  (open_clip ViT-H-14 with a local checkpoint), the reward model, and the CLIP score.

No Dagster imports and no evaluation: comparing the scorers with the sample's planted
quality is ``ml/evaluation``'s job, and models never see it.
"""
