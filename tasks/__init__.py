"""The stages: one module per stage (plain functions of rows, params and an output folder, then the
stage's spec); `pipelines.py` orders them into one table per source; `run/` is the machinery (store,
specs, runner) and `sources/` the render-folder and photo-set ingest stages."""
