"""lm-evaluation-harness's own task definitions, reading the documents prepared on disk.

Each task is the harness's YAML (prompt, choices, metrics, its Python helpers such as
HellaSwag's preprocessing), loaded from the installed `lm_eval` package, with one change: the
documents come from EVAL_TASKS_DIR/<task>/ through the harness's `custom_dataset` hook instead of
the Hugging Face hub. The harness's prompts and metrics are therefore used as they are.

One difference from the hub datasets: SciQ and ARC ship only their validation split here, so
they are scored on it (the harness prefers their test split). LAMBADA is OpenAI's test set, as
in the harness.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

from megatron.evaluation.sources import TASKS, EvalTaskError, check_prepared, load_documents, task_dir, unknown_tasks


def _dataset(folder: str, name: str, split: str, **_: Any) -> Any:
    """The harness calls this with the task's metadata as keywords; only the folder matters."""
    import datasets

    return datasets.DatasetDict({split: load_documents(folder, name)})


def harness_config(name: str, data_dir: str) -> dict[str, Any]:
    """The harness's config of `name`, reading its documents from data_dir."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    source = TASKS[name]
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / source.harness_yaml, resolve_func=True)
    cfg.update(
        custom_dataset=partial(_dataset, task_dir(data_dir, name), name, source.split),
        dataset_path=None, dataset_name=None, training_split=None,
        validation_split=source.split if source.split == "validation" else None,
        test_split=source.split if source.split == "test" else None,
    )
    return cfg


def load_tasks(names: list[str], data_dir: str) -> dict[str, Any]:
    """The harness's task dict (TaskManager.load's form) for `names`, from data_dir."""
    if unknown_tasks(names):
        raise EvalTaskError(f"unknown eval task(s) {', '.join(unknown_tasks(names))}; known: {', '.join(TASKS)}")
    check_prepared(data_dir, names)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing here may reach the hub
    from lm_eval.tasks import TaskManager

    # The harness warns about custom_dataset keywords for every task; the keywords are ours.
    logging.getLogger("lm_eval.api.task").setLevel(logging.ERROR)
    # include_defaults=False: no scan of the harness's thousands of task files (7 s); our configs are whole.
    return TaskManager(include_defaults=False).load([harness_config(n, data_dir) for n in names])
