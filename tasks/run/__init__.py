"""The run machinery: the run store (folders, markers, lock), stage specs and the pipeline runner,
progress, the versions registry. Stage modules (`tasks/*.py`) use it; it knows no stage."""
