"""How an interrupted stage or pipeline run ends in MLflow."""

from orchestration.train.training_job import ended_status


class StopFromScheduler(BaseException):
    """What a Tune stop or an actor exit looks like to the code it interrupts."""


def test_errors_fail_and_stops_are_killed():
    assert ended_status(RuntimeError("boom")) == "FAILED"
    assert ended_status(KeyboardInterrupt()) == "KILLED"
    assert ended_status(SystemExit(143)) == "KILLED"
    assert ended_status(StopFromScheduler()) == "KILLED"
