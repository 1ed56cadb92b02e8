"""The adapter's batching logic, without a server: stack, pad, infer once, split, trim, isolate."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.hooks import API_ENTRY_FAILED, INFERENCE_FAILED, Hook, HookError
from toolkit.runtime.batching import Failure, Layout, run_batch


def layout(inputs, outputs, max_batch_size=8, pad=None, trim=None, bucket_cost=0, bucket_rows=False) -> Layout:
    def tensors(items):
        return [{"name": n, "data_type": t, "dims": d} for n, t, d in items]

    params = {f"toolkit.pad.{k}": {"string_value": str(v)} for k, v in (pad or {}).items()}
    params.update({f"toolkit.trim.{k}": {"string_value": v} for k, v in (trim or {}).items()})
    if bucket_cost:
        params["toolkit.bucket_cost"] = {"string_value": str(bucket_cost)}
    if bucket_rows:
        params["toolkit.bucket_rows"] = {"string_value": "true"}
    return Layout.from_config({"max_batch_size": max_batch_size, "input": tensors(inputs),
                               "output": tensors(outputs), "parameters": params})


SCALE = layout([("X", "TYPE_FP32", [2])], [("Y", "TYPE_FP32", [2])])


class Doubler(Hook):
    def __init__(self):
        self.calls = []

    def api_entry(self, request):
        if (request["X"] < 0).any():
            raise HookError(1001, "X must be non-negative")
        if (request["X"] > 1000).any():
            raise RuntimeError("internal detail")
        return request

    def infer(self, batch):
        self.calls.append(batch["X"].shape[0])
        if np.isnan(batch["X"]).any():
            raise ValueError("NaN in batch")
        return {"Y": batch["X"] * 2}


def req(*rows) -> dict[str, np.ndarray]:
    return {"X": np.array(rows, dtype=np.float32)}


def test_run_batch_calls_infer_once_and_splits_rows_back_when_requests_batch():
    hook = Doubler()
    results = run_batch(hook, [req([1, 2]), req([3, 4], [5, 6]), req([7, 8])], SCALE)
    assert hook.calls == [4]
    np.testing.assert_array_equal(results[0]["Y"], [[2, 4]])
    np.testing.assert_array_equal(results[1]["Y"], [[6, 8], [10, 12]])
    np.testing.assert_array_equal(results[2]["Y"], [[14, 16]])


def test_run_batch_fails_only_the_rejected_request_when_api_entry_raises_hook_error():
    hook = Doubler()
    results = run_batch(hook, [req([1, 2]), req([-1, 2]), req([3, 4])], SCALE)
    assert results[1] == Failure(1001, "X must be non-negative", invalid_input=True)
    assert results[1].wire_message() == "[1001] X must be non-negative"
    assert hook.calls == [2]
    np.testing.assert_array_equal(results[2]["Y"], [[6, 8]])


def test_run_batch_uses_generic_code_without_traceback_when_api_entry_crashes():
    logged = []
    results = run_batch(Doubler(), [req([2000, 1])], SCALE, log=logged.append)
    assert results[0].code == API_ENTRY_FAILED
    assert "RuntimeError: internal detail" in results[0].message
    assert "Traceback" not in results[0].message
    assert "Traceback" in logged[0]


def test_run_batch_isolates_the_poison_request_when_infer_fails_on_the_batch():
    hook = Doubler()
    results = run_batch(hook, [req([1, 2]), req([np.nan, 2]), req([3, 4])], SCALE, log=lambda m: None)
    assert hook.calls == [3, 1, 1, 1]  # whole batch, then each request alone
    assert results[1].code == INFERENCE_FAILED and "NaN in batch" in results[1].message
    np.testing.assert_array_equal(results[0]["Y"], [[2, 4]])
    np.testing.assert_array_equal(results[2]["Y"], [[6, 8]])


def test_run_batch_pads_variable_inputs_and_trims_outputs_when_spec_allows():
    seen = {}

    class Echo(Hook):
        def infer(self, batch):
            seen["tokens"] = batch["T"].copy()
            return {"E": batch["T"] + 1, "N": (batch["T"] != 0).sum(axis=1, keepdims=True)}

    spec = layout([("T", "TYPE_INT64", [-1])], [("E", "TYPE_INT64", [-1]), ("N", "TYPE_INT64", [1])],
                  pad={"T": 0}, trim={"E": "T"})
    short, long = {"T": np.array([[5, 6]])}, {"T": np.array([[1, 2, 3, 4]])}
    results = run_batch(Echo(), [short, long], spec)
    np.testing.assert_array_equal(seen["tokens"], [[5, 6, 0, 0], [1, 2, 3, 4]])
    np.testing.assert_array_equal(results[0]["E"], [[6, 7]])
    np.testing.assert_array_equal(results[1]["E"], [[2, 3, 4, 5]])
    np.testing.assert_array_equal(results[0]["N"], [[2]])


def test_run_batch_groups_by_shape_when_variable_input_has_no_pad_value():
    calls = []

    class Echo(Hook):
        def infer(self, batch):
            calls.append(batch["T"].shape)
            return {"E": batch["T"]}

    spec = layout([("T", "TYPE_INT64", [-1])], [("E", "TYPE_INT64", [-1])])
    results = run_batch(Echo(), [{"T": np.ones((1, 2), np.int64)}, {"T": np.ones((1, 3), np.int64)},
                                 {"T": np.ones((1, 2), np.int64)}], spec)
    assert sorted(calls) == [(1, 3), (2, 2)]
    assert [r["E"].shape for r in results] == [(1, 2), (1, 3), (1, 2)]


@pytest.mark.parametrize(("outputs", "message"), [
    ({}, "returned no output 'Y'"),
    ({"Y": np.zeros((2, 2)), "Z": np.zeros(2)}, "unknown outputs ['Z']"),
    ({"Y": np.zeros((3, 2))}, "3 rows for a batch of 1"),
    ({"Y": np.zeros((2, 5))}, "shape [2, 5], config dims are [2]"),
    ([1, 2], "must return a dict"),
])
def test_run_batch_fails_every_request_with_a_clear_message_when_infer_output_is_wrong(outputs, message):
    class Wrong(Hook):
        def infer(self, batch):
            return outputs

    results = run_batch(Wrong(), [req([1, 2]), req([3, 4])], SCALE)
    assert all(isinstance(r, Failure) and message in r.message for r in results), results


def test_run_batch_converts_dtypes_and_encodes_strings_when_outputs_are_loosely_typed():
    class Loose(Hook):
        def infer(self, batch):
            rows = batch["X"].shape[0]
            return {"Y": batch["X"].astype(np.float64), "S": np.array([["ok"]] * rows)}

    spec = layout([("X", "TYPE_FP32", [2])], [("Y", "TYPE_FP32", [2]), ("S", "TYPE_STRING", [1])])
    results = run_batch(Loose(), [req([1, 2])], spec)
    assert results[0]["Y"].dtype == np.float32
    assert results[0]["S"].dtype == np.object_ and results[0]["S"][0, 0] == b"ok"


def test_run_batch_runs_each_request_alone_when_model_does_not_batch():
    hook = Doubler()
    spec = layout([("X", "TYPE_FP32", [2])], [("Y", "TYPE_FP32", [2])], max_batch_size=0)
    results = run_batch(hook, [{"X": np.array([1, 2], np.float32)}, {"X": np.array([3, 4], np.float32)}], spec)
    assert hook.calls == [2, 2]  # no batch axis: each call sees one request's 2 values
    np.testing.assert_array_equal(results[1]["Y"], [6, 8])


def test_run_batch_rejects_request_when_api_entry_returns_inconsistent_rows():
    class Bad(Hook):
        def api_entry(self, request):
            return {"X": request["X"], "EXTRA": np.zeros((5, 1))}

        def infer(self, batch):
            raise AssertionError("must not be called")

    results = run_batch(Bad(), [req([1, 2])], SCALE)
    assert results[0].code == API_ENTRY_FAILED and "same batch size" in results[0].message


def test_run_batch_splits_padded_requests_into_length_buckets_when_calls_cost_less_than_padding():
    calls = []

    class Echo(Hook):
        def infer(self, batch):
            calls.append(batch["T"].shape)
            return {"E": batch["T"]}

    inputs = [("T", "TYPE_INT64", [-1])]
    outputs = [("E", "TYPE_INT64", [-1])]
    lengths = [3, 40, 4, 41, 3, 39]
    requests = [{"T": np.full((1, n), n, np.int64)} for n in lengths]

    one_call = layout(inputs, outputs, pad={"T": 0}, trim={"E": "T"})
    run_batch(Echo(), requests, one_call)
    assert calls == [(6, 41)]  # no bucketing: everything padded to the longest

    calls.clear()
    bucketed = layout(inputs, outputs, pad={"T": 0}, trim={"E": "T"}, bucket_cost=8)
    results = run_batch(Echo(), requests, bucketed)
    assert sorted(calls) == [(3, 4), (3, 41)]  # short and long texts apart: 12 + 123 padded tokens, not 246
    for n, result in zip(lengths, results, strict=True):
        np.testing.assert_array_equal(result["E"], np.full((1, n), n))  # order and lengths preserved

    calls.clear()
    run_batch(Echo(), requests, layout(inputs, outputs, pad={"T": 0}, trim={"E": "T"}, bucket_cost=1000))
    assert calls == [(6, 41)]  # a call dearer than all the padding: one batch


def test_rows_of_a_bulk_request_are_bucketed_by_their_own_length():
    calls = []

    class Echo(Hook):
        def infer(self, batch):
            calls.append(batch["T"].shape)
            return {"E": batch["T"] * 10, "N": (batch["T"] > 0).sum(axis=1, keepdims=True)}

    inputs = [("T", "TYPE_INT64", [-1]), ("M", "TYPE_INT64", [-1])]
    outputs = [("E", "TYPE_INT64", [-1]), ("N", "TYPE_INT64", [1])]
    lengths = [3, 40, 4, 41, 3, 39]
    ids = np.zeros((6, 41), np.int64)
    for r, n in enumerate(lengths):
        ids[r, :n] = np.arange(1, n + 1)
    bulk = {"T": ids, "M": (ids > 0).astype(np.int64)}  # one request of six rows, padded to 41
    single = {"T": np.arange(1, 6, dtype=np.int64)[None], "M": np.ones((1, 5), np.int64)}
    calls.clear()
    run_batch(Echo(), [bulk, single], layout(inputs, outputs, pad={"T": 0, "M": 0}, trim={"E": "T"}, bucket_cost=8))
    assert sorted(calls) == [(1, 5), (6, 41)]  # without bucket_rows a bulk request stays whole

    calls.clear()
    bucketed = layout(inputs, outputs, pad={"T": 0, "M": 0}, trim={"E": "T"}, bucket_cost=8, bucket_rows=True)
    results = run_batch(Echo(), [bulk, single], bucketed)
    assert sorted(calls) == [(3, 41), (4, 5)]  # the short rows (and the 5-token request) apart from the long
    assert results[0]["E"].shape == (6, 41) and results[1]["E"].shape == (1, 5)
    np.testing.assert_array_equal(results[0]["E"], ids * 10)  # in order, zero past each row's own length
    np.testing.assert_array_equal(results[0]["N"][:, 0], lengths)
    np.testing.assert_array_equal(results[1]["E"], single["T"] * 10)

    calls.clear()
    run_batch(Echo(), [bulk, single], layout(inputs, outputs, pad={"T": 0, "M": 0}, trim={"E": "T"}))
    assert calls == [(7, 41)]  # without buckets: one call, everything padded to the longest


def test_a_failing_row_fails_its_whole_request_and_only_it():
    class PoisonRow(Hook):
        def infer(self, batch):
            if (batch["T"] == 99).any():
                raise ValueError("poison")
            return {"E": batch["T"]}

    inputs, outputs = [("T", "TYPE_INT64", [-1])], [("E", "TYPE_INT64", [-1])]
    bad = {"T": np.array([[1, 2, 0], [99, 1, 1]], np.int64)}
    good = {"T": np.array([[5, 6, 0], [7, 0, 0]], np.int64)}
    results = run_batch(PoisonRow(), [bad, good], layout(inputs, outputs, pad={"T": 0}, trim={"E": "T"},
                                                         bucket_cost=1000, bucket_rows=True))
    assert isinstance(results[0], Failure) and "poison" in results[0].message
    np.testing.assert_array_equal(results[1]["E"], good["T"])


class RowSum(Hook):
    """x [n, 4] and offset [n] -> score [n] (one value per row) and doubled [n, 4], like an ONNX model."""

    def infer(self, batch):
        assert batch["offset"].shape == (batch["x"].shape[0],)
        return {"score": batch["x"].sum(axis=1) + batch["offset"], "doubled": batch["x"] * 2}


# As Triton hands the config of a spec with dims [] to the adapter: dims [1] + reshape { shape: [] }.
ROW_SUM = Layout.from_config({
    "max_batch_size": 8,
    "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]},
              {"name": "offset", "data_type": "TYPE_FP32", "dims": [1], "reshape": {"shape": []}}],
    "output": [{"name": "score", "data_type": "TYPE_FP32", "dims": [1], "reshape": {}},  # empty shape omitted
               {"name": "doubled", "data_type": "TYPE_FP32", "dims": [4]}]})


def test_layout_takes_the_models_dims_from_a_reshape():
    assert ROW_SUM.inputs["offset"].dims == () and ROW_SUM.inputs["offset"].api_dims == (1,)
    assert ROW_SUM.outputs["score"].dims == () and ROW_SUM.outputs["score"].api_dims == (1,)
    assert ROW_SUM.inputs["x"].dims == (4,) and ROW_SUM.inputs["x"].api_dims is None


def test_run_batch_splits_one_value_per_row_outputs_back_per_request():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    requests = [{"x": x[:1], "offset": np.array([10], np.float32)},  # Triton has reshaped [n, 1] to [n]
                {"x": x[1:], "offset": np.array([20, 30], np.float32)}]
    results = run_batch(RowSum(), requests, ROW_SUM)
    np.testing.assert_array_equal(results[0]["score"], [16])
    np.testing.assert_array_equal(results[1]["score"], [42, 68])
    assert results[1]["score"].shape == (2,) and results[1]["doubled"].shape == (2, 4)


def test_layout_converts_a_reshaped_tensor_between_the_models_and_tritons_shape():
    assert ROW_SUM.input_from_api("offset", np.zeros((3, 1), np.float32)).shape == (3,)
    assert ROW_SUM.output_to_api("score", np.zeros(3, np.float32)).shape == (3, 1)
    assert ROW_SUM.output_to_api("doubled", np.zeros((3, 4), np.float32)).shape == (3, 4)  # no reshape: as is
