"""Image sources other than episodes: render folders (3-D product renders) and photo sets, each an
ingest stage feeding the same dataset and training stages; render_training.py is the render guide's
two-stage plan as train parameters (the package stage writes its AI-Toolkit jobs)."""
