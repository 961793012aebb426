"""The runtime never imports torch, transformers or diffusers, even while generating."""

import json
import subprocess
import sys

from tiny_models import tiny_bundle

SCRIPT = r"""
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    # Behave as if the PyTorch stack were not installed at all.
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"torch", "transformers", "diffusers", "optimum", "onnx"}:
            raise ImportError(f"blocked: {name}")

sys.meta_path.insert(0, Block())
from edgediff.runtime import Pipeline
pipe = Pipeline.from_bundle(sys.argv[1], provider="cpu")
out = pipe("a red circle on a blue background", num_inference_steps=2, seed=1)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "transformers", "diffusers", "optimum", "onnx"})
print(json.dumps({"size": list(out.images[0].size), "heavy": heavy}))
"""


def test_runtime_runs_without_the_pytorch_stack(models_root):
    bundle = tiny_bundle("tiny-sd1", models_root)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(bundle)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"size": [64, 64], "heavy": []}
