"""`toolkit bench perf` without a server: the input data it makes from a model's config and export,
the perf_analyzer options it refuses or reads, the output it parses, and a binary that cannot start.
(tests/e2e/test_bench_perf.py runs the real perf_analyzer against the real server.)"""

from __future__ import annotations

import base64
import json
import struct

import pytest
from click.testing import CliRunner

from toolkit.bench.perf_analyzer import (
    PerfAnalyzer,
    _environment,
    failure_reason,
    parse_csv,
    parse_steps,
    passthrough_shapes,
)
from toolkit.bench.perf_data import input_data
from toolkit.bench.pipelines import load_corpus
from toolkit.cli.main import cli
from toolkit.errors import BenchError

BERT = """name: "bert"
backend: "python"
max_batch_size: 8
input { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }
input { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }
input { name: "token_type_ids" data_type: TYPE_INT64 dims: [ -1 ] }
output { name: "last_hidden_state" data_type: TYPE_FP32 dims: [ -1, 4 ] }
parameters { key: "input_range.token_type_ids" value: { string_value: "0:1" } }
"""
PREPROCESS = """name: "preprocess"
backend: "python"
max_batch_size: 8
input { name: "BLOB" data_type: TYPE_STRING dims: [ 1 ] }
output { name: "image" data_type: TYPE_FP32 dims: [ 4, 4, 3 ] }
parameters { key: "toolkit.hook" value: { string_value: "toolkit.builtins.image:ImagePreprocess" } }
"""
TOKENIZER = """name: "tokenizer"
backend: "python"
max_batch_size: 8
input { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] }
output { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }
parameters { key: "toolkit.hook" value: { string_value: "toolkit.builtins.text:WordPieceTokenizer" } }
"""
PIPELINE = """name: "pipeline"
platform: "ensemble"
max_batch_size: 8
input { name: "PAYLOAD" data_type: TYPE_STRING dims: [ 1 ] }
input { name: "QUERY" data_type: TYPE_STRING dims: [ 1 ] }
input { name: "SCALE" data_type: TYPE_FP32 dims: [ 2, -1 ] }
output { name: "OUT" data_type: TYPE_FP32 dims: [ 4, 4, 3 ] }
ensemble_scheduling {
  step { model_name: "preprocess" model_version: -1 input_map { key: "BLOB" value: "PAYLOAD" }
         output_map { key: "image" value: "OUT" } }
  step { model_name: "tokenizer" model_version: -1 input_map { key: "TEXT" value: "QUERY" }
         output_map { key: "input_ids" value: "ids" } }
}
"""


@pytest.fixture
def repository(tmp_path):
    root = tmp_path / "repo"
    for name, text in (("bert", BERT), ("preprocess", PREPROCESS), ("tokenizer", TOKENIZER), ("pipeline", PIPELINE)):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(text)
    (root / "bert" / "1" / "export.json").write_text(json.dumps({"kind": "bert", "vocab_size": 100,
                                                                  "type_vocab_size": 2}))
    (root / "bert" / "2").mkdir()  # the newest version folder is the one read
    (root / "bert" / "2" / "export.json").write_text(json.dumps({"kind": "bert", "vocab_size": 50, "inputs": [
        {"name": name, "dim_names": ["batch", "sequence"]} for name in ("input_ids", "attention_mask")]}))
    return root


def test_input_data_draws_token_ids_within_the_declared_ranges_when_the_model_is_a_bert_export(repository):
    made = input_data(repository, "bert", default_dim=32)
    requests = made.data["data"]
    assert len(requests) == 16
    ids = [v for r in requests for v in r["input_ids"]["content"]]
    assert min(ids) >= 0 and max(ids) < 50 and max(ids) > 40  # version 2's vocabulary, and spread over it
    assert {v for r in requests for v in r["attention_mask"]["content"]} == {0, 1}
    assert {v for r in requests for v in r["token_type_ids"]["content"]} == {0}  # the parameter overrides export
    assert all(r["input_ids"]["shape"] == [32] and len(r["input_ids"]["content"]) == 32 for r in requests)
    assert made.notes[0] == "input_ids: INT64 in [0, 50), shape [32]"


def test_input_data_gives_variable_dims_the_users_shape_or_a_shared_dims_when_one_is_given(repository):
    made = input_data(repository, "bert", {"input_ids": [7], "token_type_ids": [5]})
    first = made.data["data"][0]
    assert len(first["input_ids"]["content"]) == 7 and len(first["token_type_ids"]["content"]) == 5
    assert first["attention_mask"]["shape"] == [7]  # export.json: it shares 'sequence' with input_ids
    assert input_data(repository, "bert", {"token_type_ids": [5]}).data["data"][0]["input_ids"]["shape"] == [16]
    with pytest.raises(BenchError, match=r"--shape input_ids:3,4 does not fit its dims \[-1\]"):
        input_data(repository, "bert", {"input_ids": [3, 4]})
    with pytest.raises(BenchError, match=r"--shape names \['nope'\], not inputs of 'bert'"):
        input_data(repository, "bert", {"nope": [3]})


def test_input_data_sends_images_and_texts_where_an_ensembles_steps_take_them(repository):
    made = input_data(repository, "pipeline", {"SCALE": [2, 5]})
    requests = made.data["data"]
    corpus = load_corpus()
    assert len(requests) == len(corpus)  # the longest column: every sentence once
    assert [r["QUERY"]["content"] for r in requests] == [[text] for text in corpus]
    raw = base64.b64decode(requests[0]["PAYLOAD"]["b64"])
    (length,) = struct.unpack("<I", raw[:4])  # Triton's serialized BYTES element: length, then the bytes
    assert length == len(raw) - 4 and raw[4:6] == b"\xff\xd8"  # one JPEG
    assert requests[0]["PAYLOAD"]["shape"] == [1]
    assert requests[0]["SCALE"]["shape"] == [2, 5] and len(requests[0]["SCALE"]["content"]) == 10
    assert made.notes[0].startswith("PAYLOAD: 64 JPEG images") and made.notes[1].startswith("QUERY: 501 sentences")


def test_input_data_names_the_flag_when_the_model_is_not_in_the_repository(repository):
    with pytest.raises(BenchError, match=r"repo/missing/config.pbtxt not found: .*--repository chooses another"):
        input_data(repository, "missing")


def test_passthrough_refuses_the_options_the_toolkit_sets_and_reads_shapes():
    shapes, own = passthrough_shapes(["--concurrency-range", "1:4", "--shape", "input_ids:64", "--shape=mask:2,3"])
    assert shapes == {"input_ids": [64], "mask": [2, 3]} and not own
    assert passthrough_shapes(["--input-data", "mine.json"]) == ({}, True)
    for args, hint in ((["-u", "x:1"], "--url"), (["-mbert"], "MODEL"), (["-i", "http"], "--protocol"),
                       (["-f", "a.csv"], "--out")):
        with pytest.raises(BenchError, match=f"set by toolkit bench perf: use {hint} instead"):
            passthrough_shapes(args)
    with pytest.raises(BenchError, match="expected NAME:d1,d2"):
        passthrough_shapes(["--shape", "input_ids"])


CSV = """Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,\
Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,Avg latency,\
request/response,response wait
1,91.8612,4,1802,3,62,7985,995,1,6462,13948,25929,78899,10855,5,10832
2,115.903,20,5398,1,79,10232,1420,5,13633,26709,39032,89713,17159,25,16950
"""
OUTPUT = """Request concurrency: 1
  Client:
    p50 latency: 6462 usec
  Composing models:
  bert, version: 1
      Avg request latency: 8224 usec (overhead 2 usec + queue 203 usec + compute input 24 usec + compute infer 7654 \
usec + compute output 341 usec)

  pooling, version: 1
      Avg request latency: 3111 usec (overhead 2 usec + queue 1571 usec + compute input 29 usec + compute infer 1238 \
usec + compute output 271 usec)

Request concurrency: 2
  Client:
    p50 latency: 13633 usec
"""


def test_perf_analyzers_csv_and_composing_models_are_read_in_milliseconds(tmp_path):
    (tmp_path / "perf.csv").write_text(CSV)
    first, second = parse_csv(tmp_path / "perf.csv")
    assert (first.load, first.value, first.throughput) == ("concurrency", 1.0, 91.8612)
    assert (first.p50_ms, first.p99_ms, first.server_queue_ms, first.server_compute_infer_ms) == (
        6.462, 78.899, 0.003, 7.985)
    assert second.p95_ms == 39.032 and first.errors == 0
    header, *rows = CSV.strip().splitlines()  # perf_analyzer may write the faster point first
    (tmp_path / "reversed.csv").write_text("\n".join([header, *reversed(rows)]) + "\n")
    assert [p.value for p in parse_csv(tmp_path / "reversed.csv")] == [1.0, 2.0]
    steps = parse_steps(OUTPUT)
    assert [(s.model, s.queue_ms, round(s.compute_ms, 3)) for s in steps[1.0]] == [
        ("bert", 0.203, 8.019), ("pooling", 1.571, 1.538)]
    assert 2.0 not in steps  # no composing models there: a plain model


def test_a_failed_run_is_reduced_to_the_servers_reason():
    output = "Request concurrency: 1\nFailed to maintain requested inference load.\nThread [0] had error: [1301] " \
             "input 'input_ids' holds -86, outside [0, 30522)\n"
    assert failure_reason(output) == "[1301] input 'input_ids' holds -86, outside [0, 30522)"
    assert "raise --measurement-interval" in failure_reason(
        "Failed to obtain stable measurement within 10 measurement windows for concurrency 1.")


def test_a_binary_that_cannot_start_is_one_error_line_with_the_install_step(tmp_path):
    fake = tmp_path / "bin" / "perf_analyzer"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'perf_analyzer: error while loading shared libraries: libb64.so.0d: cannot "
                    "open shared object file' >&2\nexit 127\n")
    fake.chmod(0o755)
    result = CliRunner().invoke(cli, ["bench", "perf", "bert", "--perf-analyzer", str(fake)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("Error: perf_analyzer at ")
    assert "libb64.so.0d" in result.output and "./dev.sh setup installs it into .venv-perf" in result.output


def test_the_cuda_runtime_of_the_binarys_venv_goes_on_the_library_path(tmp_path):
    libs = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "nvidia" / "cuda_runtime" / "lib"
    libs.mkdir(parents=True)
    env = _environment(tmp_path / "venv" / "bin" / "perf_analyzer")
    assert env["LD_LIBRARY_PATH"].split(":")[0] == str(libs)
    assert PerfAnalyzer(tmp_path / "x", env).env is env
