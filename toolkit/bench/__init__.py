"""`toolkit bench`: load generation, the servers we compare against, and reports for the served pipelines.

    loadgen.py     the load generator (its own process), TargetSpec, PointSpec
    workloads.py   what is sent; processes.py  a server process and its readiness
    runner.py      the contenders: the in-process limit, serve(), measure_point
    peers.py       peer servers (mosec, infinity, ray): start, check, stop; peer_envs.py their venvs
    servers/       every server we compare against, each run as its own process
    pipelines.py, compare.py, report.py, data/
    roofline.py    the machine's matrix-product peak, FLOPs per request from the ONNX graph, CPU flags
    breakdown.py   where a batch's CPU and a request's latency go under load (benchmarks/breakdown.py)
    perf_analyzer.py  Triton's perf_analyzer (`toolkit bench perf`): find it, run it, read its CSV;
    perf_data.py      its --input-data, made from a generated model's config and export

Imports: everything below the CLI (the client, the repository, the server); nothing imports it but
the CLI.
"""
