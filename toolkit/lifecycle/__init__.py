"""Model lifecycle on a running server (Paddle Serving's versions and hot reload): golden samples
recorded at export (``golden.py``), and zero-downtime rollout and rollback (``rollout.py``)."""
