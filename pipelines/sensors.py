"""Sensors of the code location."""

import dagster as dg

# Brings every downstream table up to date when new raw data lands (eager conditions).
warehouse_automation = dg.AutomationConditionSensorDefinition(
    "warehouse_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Materializes assets whose eager automation condition fires "
        "(new crawl pages → release → clean tables → catalog)."
    ),
)

SENSORS = [warehouse_automation]
