"""The table `unclip pipeline` ends with."""

from orchestration.pipeline import format_summary

SUMMARY = {"experiment_id": "7", "table": [
    {"step": "data", "status": "done", "seconds": 1.2, "metrics": {"train": 40, "test": 8},
     "output": "/d", "run_id": ""},
    {"step": "clip", "status": "skipped: complete", "seconds": 0.04,
     "metrics": {"val_loss": 1.234567}, "output": "/r/clip/portable", "run_id": "abc"},
]}


def test_table_links_runs_on_a_tracking_server():
    assert format_summary(SUMMARY, "http://127.0.0.1:5000/").splitlines() == [
        "step  status             time  results          output            MLflow run",
        "data  done               1s    train=40 test=8  /d",
        "clip  skipped: complete  0s    val_loss=1.235   /r/clip/portable  "
        "http://127.0.0.1:5000/#/experiments/7/runs/abc",
    ]


def test_table_names_the_run_for_a_local_store():
    last = format_summary(SUMMARY, "sqlite:///tmp/mlflow.db").splitlines()[-1]
    assert last.endswith("/r/clip/portable  abc")
