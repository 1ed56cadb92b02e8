"""Config ``parameters`` keys the toolkit reserves for itself; written by gen-repo, read by the adapter."""

HOOK = "toolkit.hook"
API_PATH = "toolkit.api_path"
PAD_PREFIX = "toolkit.pad."
TRIM_PREFIX = "toolkit.trim."
#: The built-in hook that runs an ONNX file with onnxruntime on the embedded (python-only) server.
ONNX_HOOK = "toolkit.runtime.onnx_hook:OnnxModel"
BUCKET_COST = "toolkit.bucket_cost"
BUCKET_ROWS = "toolkit.bucket_rows"
#: ``execution: fused``: the version folder's file that lists the steps the adapter runs in one process.
FUSED = "toolkit.fused"
