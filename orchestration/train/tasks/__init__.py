"""Stage tasks: what differs between CLIP, prior and decoder training; the loop owns the rest.

One module per stage (`clip.py`, `prior.py`, `decoder.py`), each a subclass of
`base.Task`; `orchestration.stages` lists them in training order. A task answers, on the
driver: which upstream stages it needs (`requires`), what it trains on (`dataset_kind`,
`datasets`, `train_samples`) and what it prepares in storage for its workers (`prepare`);
and in each worker: the model (`build_model`, `model_config`, `model_from_config`), batches
(`to_batch`), the loss (`compute_loss`), per-step hooks (`after_step`) and evaluation
(`evaluate`). The loop, the driver, the pipeline DAG, the registry and the sweeps ask the
task and never compare stage names.
"""
