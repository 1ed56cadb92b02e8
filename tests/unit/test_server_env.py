"""The environment the python stubs start in."""

from toolkit.server import BLAS_THREAD_VARIABLES, stub_environment


def test_stubs_get_one_blas_thread_by_default():
    env = stub_environment({"PATH": "/usr/bin"})
    assert {name: env[name] for name in BLAS_THREAD_VARIABLES} == dict.fromkeys(BLAS_THREAD_VARIABLES, "1")


def test_the_callers_blas_threads_win():
    env = stub_environment({"PATH": "/usr/bin", "OPENBLAS_NUM_THREADS": "4"})
    assert env["OPENBLAS_NUM_THREADS"] == "4"
    assert env["MKL_NUM_THREADS"] == "1"


def test_stubs_find_this_package_first():
    env = stub_environment({"PATH": "/usr/bin", "PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(":")[-1] == "/elsewhere"
    assert env["PATH"].endswith(":/usr/bin")
