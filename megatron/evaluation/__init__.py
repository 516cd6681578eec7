"""lm-evaluation-harness tasks on the framework's own model: task documents prepared offline
(sources.py), the harness's task definitions over them (tasks.py), the model run over one
replica at any layout (replica.py), the harness model class (harness.py), and the eval.py worker
and the training loop's task evaluation (run.py)."""
