"""Ray Train jobs, DeepSpeed setup, MLflow tracking and registry, the pipeline DAG and the CLI."""
