"""The planner behind `deepy.py --dry-run`: memory per GPU by category, step time on a cluster,
and a search over layouts (docs/planner.md).

cluster.py reads cluster files; memory.py and step_time.py are the model; search.py ranks
layouts; measure.py measures a CPU run the model is checked against.
"""
