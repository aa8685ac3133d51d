"""Cluster jobs: submitting `unclip pipeline` to a Ray cluster through the Jobs API, and
status, logs, stop and list (`submission`, `cli`). Imports only `orchestration.config` and
`common/`: a laptop that submits needs no torch.
"""
