"""deepy.py's work: validate and plan a run (dry_run.py), start its workers (launch.py)."""
