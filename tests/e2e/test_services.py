"""The example's embedding and mobile services, end to end on the real tritonserver.

The server is `example_server` (tests/e2e/conftest.py): the project's own specs with freshly exported
ONNX files, the real all-MiniLM-L6-v2 BERT and a MobileNetV2 (random weights).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reference_embedding import reference_embeddings
from serving import call_concurrently

from toolkit.client import TritonClient
from toolkit.errors import InferenceError

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SENTENCES = [
    "Triton serves this sentence.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Ein Satz auf Deutsch mit Umlauten: Grüße aus München, café crème.",
    "你好，世界。这是一个中文句子。",
    "a",
    "emoji 🚀 and symbols ∑ ≠ ∞",
    " ".join(["long"] * 300) + " text beyond the maximum sequence length",
]


@pytest.fixture(scope="module")
def services(example_server):
    return example_server


def url(server, protocol):
    return server.http_url if protocol == "http" else server.grpc_url


def texts(*items: str | bytes) -> np.ndarray:
    return np.array([[t.encode("utf-8") if isinstance(t, str) else t] for t in items], dtype=object)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_embedding_matches_the_sentence_transformers_reference(services, protocol):
    with TritonClient(url(services, protocol), protocol=protocol) as client:
        served = client.infer("embedding", {"TEXT": texts(*SENTENCES)})["EMBEDDING"]
    assert served.shape == (len(SENTENCES), 384) and served.dtype == np.float32
    similarity = cosines(served, reference_embeddings(SENTENCES))
    assert similarity.min() >= 0.9999, dict(zip(SENTENCES, similarity.round(6), strict=True))
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)


def test_concurrent_texts_of_different_lengths_batch_together_and_stay_correct(services):
    words = "serving models on triton with dynamic batching keeps every core busy under load".split()
    corpus = [" ".join(words[: 3 + (i * 5) % 12] * (1 + i % 4)) for i in range(24)]
    with TritonClient(services.http_url) as client:
        before = client.statistics("bert")
    results = call_concurrently(services.grpc_url, "embedding", [{"TEXT": texts(t)} for t in corpus])
    served = np.concatenate([r["EMBEDDING"] for r in results])
    assert cosines(served, reference_embeddings(corpus)).min() >= 0.9999
    with TritonClient(services.http_url) as client:
        after = client.statistics("bert")
    inferences = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert inferences == 24 and executions < inferences, (inferences, executions)


@pytest.mark.parametrize(("bad", "code"), [(b"", 1001), (b"   ", 1001), (b"\xff\xfe\xfd", 1002),
                                           (b"x" * 70000, 1003)])
def test_bad_text_fails_alone_with_its_code(services, bad, code):
    requests = [{"TEXT": texts(bad if i == 2 else f"sentence number {i}")} for i in range(6)]
    results = call_concurrently(services.grpc_url, "embedding", requests)
    assert isinstance(results[2], InferenceError) and results[2].code == code, results[2]
    good = [r["EMBEDDING"][0] for i, r in enumerate(results) if i != 2]
    expected = reference_embeddings([f"sentence number {i}" for i in range(6) if i != 2])
    assert cosines(np.stack(good), expected).min() >= 0.9999


def test_text_of_the_wrong_dtype_gets_a_clear_error(services):
    with TritonClient(services.grpc_url, protocol="grpc") as client, pytest.raises(InferenceError) as info:
        client.infer("embedding", {"TEXT": np.ones((1, 1), dtype=np.float32)})
    assert "TEXT" in str(info.value) and "BYTES" in str(info.value)


def encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def test_mobile_embeds_images_exactly_as_preprocessing_plus_onnxruntime_in_process(services, mobilenet_export):
    import onnxruntime as ort

    from toolkit.builtins.image import ImagePreprocess
    from toolkit.hooks import HookContext

    rng = np.random.default_rng(1)
    payloads = [encode((rng.random((300, 400, 3)) * 255).astype(np.uint8), "PNG"),
                encode((rng.random((224, 224, 3)) * 255).astype(np.uint8), "JPEG")]
    batch = np.array([[p] for p in payloads], dtype=object)
    with TritonClient(services.grpc_url, protocol="grpc") as client:
        served = client.infer("mobile", {"IMAGE": batch})["EMBEDDING"]
    hook = ImagePreprocess()
    hook.init(HookContext(model_name="preprocess", model_version=1, model_dir=Path(".")))
    pixels = hook.infer(hook.api_entry({"IMAGE": batch}))["image"]
    session = ort.InferenceSession(str(Path(mobilenet_export) / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(["embedding"], {"image": pixels})[0]
    assert served.shape == (2, 1280)
    # MobileNetV2 with random weights (no ImageNet download here) gives tiny outputs, so compare
    # relative to their scale, and make sure the two images really give different embeddings.
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(served / scale, expected / scale, rtol=0, atol=1e-4)
    assert np.abs(expected[0] - expected[1]).max() / scale > 1e-2


def test_corrupt_image_fails_alone_with_its_code(services):
    good = encode(np.full((64, 64, 3), 128, dtype=np.uint8), "PNG")
    requests = [{"IMAGE": np.array([[b"\x89PNG\r\n\x1a\n garbage" if i == 1 else good]], dtype=object)}
                for i in range(4)]
    results = call_concurrently(services.grpc_url, "mobile", requests)
    assert isinstance(results[1], InferenceError) and results[1].code == 1101
    assert "not a valid image" in str(results[1])
    outputs = [r["EMBEDDING"] for i, r in enumerate(results) if i != 1]
    assert all(np.array_equal(outputs[0], o) for o in outputs)  # same image, same answer
