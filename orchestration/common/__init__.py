"""Shared plumbing every room uses: connecting to Ray (`ray_runtime`), MLflow tracking
(`tracking`), where a run's outputs live in storage (`layout`), making sure the dataset
exists (`data_check`), quiet library logs and torch thread counts. Imports only
`orchestration.config`, `orchestration.stages`, `data_pipelines` and `models`; never another
room, so serving can use it without pulling in training.
"""
