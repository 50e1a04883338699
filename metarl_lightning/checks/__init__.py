"""Checks that run before a run touches anything: a failed start leaves every file and MLflow run as it was.

* :mod:`.hyperparameters`: every model hyperparameter within what it allows.
* :mod:`.checkpoint`: a checkpoint loads, is ours, and matches what an exact resume depends on.
* :mod:`.resources`: the output folder is writable and the config fits in the machine's memory.
* :mod:`.tracking`: the MLflow store is writable (sqlite) or reachable within seconds (server).
* :mod:`.run_lock`: one live fit per run folder.

Every check raises :class:`~metarl_lightning.errors.ConfigError` with one line naming the field.
"""
