"""Serving: the Ray Serve deployment and JSON API (`serving`), the browser page
(`web_app`) and the `unclip generate / serve / models` commands (`models_cli`). May import
`common/` and `registry/`; never `train/`, `evaluate/`, `jobs/`, `tuning`, Ray Train or
DeepSpeed.
"""
