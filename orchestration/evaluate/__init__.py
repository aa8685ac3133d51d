"""Evaluation: the separately trained reference evaluator (`evaluator`) and the metrics of a
pipeline's generated images with their bootstrap intervals and paired comparison
(`evaluation`). May import `common/`, `train/` (the evaluator is a CLIP trained by the same
loop) and `registry/`; never `serve/`, `jobs/` or `tuning`.
"""
