"""The servers the toolkit is benchmarked against, each a script run as its own process.

``naive``            FastAPI + uvicorn, one request -> one pipeline run (what a user writes instead)
``pytriton_server``  PyTriton serving the same pipeline with ``@batch`` (the closest anchor tool)
``mosec_server``     mosec, in its own venv (requirements-mosec.txt)        } both run peer_models.py's
``ray_server``       Ray Serve, in its own venv (requirements-ray.txt)      } models
``requirements-infinity.txt``  infinity-emb's venv (infinity is its own CLI)

naive and pytriton_server run in the project's venv as ``python -m toolkit.bench.servers.<name>`` and
serve exactly ``toolkit.bench.pipelines``, so only the serving differs from the in-process limit. The
peer scripts run by path in their own venvs and import nothing from ``toolkit``; ``toolkit.bench.peers``
starts and checks them. Nothing in the toolkit imports this package.
"""
