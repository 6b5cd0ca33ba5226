"""Prefect flows: thin wrappers that record a run and hand a slice of a pipeline table
(tasks/pipelines.py) to the runner (tasks/run/runner.py): episode_to_lora for episodes, source_to_lora
for render folders and photo sets (one flow, `source` picks the table); params.py and source_params.py
are their parameter models."""
