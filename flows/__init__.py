"""Prefect flows: thin wrappers that record a run and hand a slice of a pipeline table
(tasks/pipelines.py) to the runner (tasks/run/runner.py); params.py is a run's parameter model."""
