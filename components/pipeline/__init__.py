"""Pipeline plumbing beside the stages: stage registry, caching keys, MLflow runs and registry, storage."""
