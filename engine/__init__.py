"""Training engine: config tree, trainer loop, parallelism, checkpoints, schedules, metrics.

May import `models` and `data_pipeline`; never imports `launch`. Owns no model definitions
and no data order: it builds them from the config and drives the loop.
"""
