"""The model registry: registering a pipeline in MLflow, versions, aliases and the paired
promotion gate (`registry`), and the MLflow pyfunc model that serving loads (`pyfunc_model`).
Imports only `common/`, `data_pipelines` and `models`: never Ray Train, DeepSpeed or any other
room, so a serving process that reads the registry carries no training stack.
"""
