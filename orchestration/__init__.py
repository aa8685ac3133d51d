"""Running unCLIP training, evaluation, registration and serving on Ray.

The top level composes the rooms below: `config` (typed configuration), `stages` (the stage
list), `pipeline` (the stage DAG: data, CLIP, embeddings, prior, decoder, evaluation, gate,
registration), `release` (a registered pipeline as a folder anyone can use) and `cli`.
The rooms, and the direction each may import in (docs/architecture.md; enforced by
tests/test_architecture.py):

    common/    Ray connection, MLflow tracking, storage layout, dataset check, logging
    train/     the training loop, DeepSpeed set-up, the Ray Train driver, stage tasks, embedding job
    evaluate/  the reference evaluator, metrics over generated images, paired comparison
    registry/  the MLflow model registry and the pyfunc model
    serve/     Ray Serve deployment, JSON API, the web page, generation commands
    jobs/      submission of the pipeline to a Ray cluster as a job
"""
