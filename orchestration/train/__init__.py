"""Training: the one generic loop (`train_loop`), DeepSpeed engine set-up (`engine_setup`),
the per-rank data stream and Ray Train session (`loop_session`), the Ray Train driver that runs
a stage as a `TorchTrainer` job (`training_job`), one task per stage (`tasks/`) and the
embedding job that precomputes CLIP embeddings for the prior (`embed_job`). May import
`common/` and `registry/` (to start from a registered model); never `evaluate/`, `serve/`,
`jobs/` or `tuning`.
"""
