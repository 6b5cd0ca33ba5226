"""Image sources other than episodes: render folders (3-D product renders) and photo sets, each an
ingest stage feeding the same dataset and training stages."""
