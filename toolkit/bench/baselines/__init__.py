"""The servers the toolkit is benchmarked against, each a script run as its own process.

``naive``            FastAPI + uvicorn, one request -> one pipeline run (what a user writes instead)
``pytriton_server``  PyTriton serving the same pipeline with ``@batch`` (the closest anchor tool)

Both serve exactly ``toolkit.bench.pipelines``, so only the serving differs from the in-process limit.
"""
