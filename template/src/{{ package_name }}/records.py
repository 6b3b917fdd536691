"""The names of the files that runs and checkpoints hold, for the modules that write and read them. Every JSON file the
project writes (checkpoint records, metrics.json, predictions.jsonl) is valid JSON: a NaN or infinite number, which
json.dumps would write as the invalid `NaN`/`Infinity`, is written as null."""

import json
import math

METRICS_FILE = "metrics.jsonl"  # in each run folder: metrics_log.py writes it, runs.py reads it
STATE_FILE = "trainer_state.json"  # in each checkpoint, written last: a checkpoint folder without it is incomplete
WEIGHTS_FILE = "model.safetensors"  # what checkpoints.export writes for a module without save_pretrained
RUN_CONFIG_FILE = "run_config.json"  # in an exported model folder: the config of the run that trained it


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def to_json(value, indent: int | None = None) -> str:
    return json.dumps(_finite(value), indent=indent, allow_nan=False)


def task_name(target: str) -> str:
    """A task's name (task=<name>: configs/task/<name>.yaml, tasks/<name>.py) from its class, the task._target_ that a
    run's config records."""
    return target.rsplit(".", 2)[-2] if target.count(".") >= 2 else target
