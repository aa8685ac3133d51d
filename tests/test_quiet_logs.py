"""The library lines we filter are filtered at the loggers that really make them."""

import logging


def test_filtered_loggers_are_the_ones_ray_uses():
    from ray.train.v2._internal.execution import context, storage

    from orchestration.common.quiet_logs import quiet_library_logs

    quiet_library_logs()
    for module in (context, storage):  # per-report dumps and "Checkpoint created" lines
        assert not module.logger.isEnabledFor(logging.INFO), module.__name__
        assert module.logger.isEnabledFor(logging.WARNING), module.__name__
