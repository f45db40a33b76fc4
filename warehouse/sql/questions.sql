-- Example questions about the ImageGem data, answered as plain SQL on the catalog
-- ($IMAGEGEM_HOME/warehouse.duckdb). Parameterised questions read DuckDB variables, e.g.
--   SET VARIABLE tag = 'anime'; SET VARIABLE image_id = 123; SET VARIABLE user_hash = '…';
--   SET VARIABLE model_version_id = 456;
-- `imagegem tour` runs each of them with example values taken from the data.

-- name: unique_prompts
-- How many unique prompts and negative prompts are there?
SELECT count(DISTINCT prompt) AS unique_prompts,
       count(DISTINCT negativePrompt) AS unique_negative_prompts
FROM images;

-- name: base_model_families
-- All base model families that LoRAs were trained on.
SELECT baseModel, count(*) AS loras
FROM loras
GROUP BY baseModel
ORDER BY loras DESC, baseModel;

-- name: primary_sd15_loras
-- Primary LoRA files trained on SD 1.5.
SELECT modelVersionId, modelName, fileName
FROM models
WHERE "primary" = 1 AND baseModel = 'SD 1.5'
ORDER BY modelVersionId;

-- name: loras_with_tag
-- LoRAs carrying a given tag (SET VARIABLE tag = '…').
SELECT modelVersionId, modelName, tags
FROM loras
WHERE list_contains(list_transform(tags, lambda t: lower(t)), lower(getvariable('tag')))
ORDER BY modelVersionId;

-- name: image_model_versions
-- All model versions used by one image (SET VARIABLE image_id = …).
SELECT il.imageId, il.modelVersionId, l.modelName, l.lora_name, il.tag_weight
FROM image_loras il LEFT JOIN loras l USING (modelVersionId)
WHERE il.imageId = getvariable('image_id')
ORDER BY il.modelVersionId;

-- name: multi_lora_images
-- Images made with more than one LoRA.
SELECT imageId, count(*) AS n_loras, list(modelVersionId ORDER BY modelVersionId) AS model_versions
FROM images
GROUP BY imageId
HAVING count(*) > 1
ORDER BY n_loras DESC, imageId;

-- name: user_images_and_models
-- All images and models of one user (SET VARIABLE user_hash = '…').
SELECT 'image' AS item_kind, imageId AS item_id, createdAt AS at
FROM (SELECT DISTINCT imageId, createdAt FROM images WHERE userHash = getvariable('user_hash'))
UNION ALL
SELECT 'model_version', modelVersionId, publishedAt
FROM loras WHERE userHash = getvariable('user_hash')
ORDER BY item_kind, item_id;

-- name: images_by_other_users
-- Images of a model version made by users other than its uploader (SET VARIABLE model_version_id = …).
SELECT DISTINCT i.imageId, i.userHash
FROM images i JOIN loras l USING (modelVersionId)
WHERE i.modelVersionId = getvariable('model_version_id') AND i.userHash <> l.userHash
ORDER BY i.imageId;
