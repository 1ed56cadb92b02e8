"""`toolkit bench`: load generation, baselines and reports for the served pipelines."""
