"""The Dagster shell: assets by stage, partitions, resources, checks. Work lives in core/."""
