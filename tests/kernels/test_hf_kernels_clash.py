"""Our import name `kernels` is also Hugging Face's hub-kernels package, which transformers probes.

transformers asks `is_kernels_available()`: find_spec("kernels") succeeds (it finds ours), then it reads
the version of the distribution providing `kernels` (here `kbitscale`, 0.x outside the hub package's
supported [0.16, 0.17) range) or, without metadata, `kernels.__version__` (we define none), so the
integration reports unavailable and transformers never imports hub-kernels names from our package.
Runs in a subprocess so transformers' cached probes start fresh.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys, torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils import import_utils
import kernels

out = {
    "available": import_utils.is_kernels_available(),
    "kernels_file": kernels.__file__,
    "has_version": hasattr(kernels, "__version__"),
}
cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).eval()
model.save_pretrained(sys.argv[1])
loaded = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.randint(0, 96, (2, 12))
with torch.no_grad():
    a, b = model(ids).logits, loaded(ids).logits
    w = loaded.model.layers[0].mlp.up_proj.weight
    w_hat = kernels.fake_quantize(w, kernels.QuantSpec("nf", 4, 64))
out.update(shape=list(b.shape), same=bool(torch.equal(a, b)), finite=bool(torch.isfinite(b).all()),
           quant_err=float((w_hat - w).abs().max() / w.abs().max()))
# Without distribution metadata (repo on sys.path, not installed) the probe imports `kernels` and
# reads `__version__`: none, so "N/A", which is_kernels_available() treats as unavailable.
import importlib.metadata as md
real_version = md.version
def no_metadata(name):
    if name in ("kbitscale", "kernels"):
        raise md.PackageNotFoundError(name)
    return real_version(name)
md.version = no_metadata
out["no_metadata_probe"] = list(import_utils._is_package_available("kernels", return_version=True))
md.version = real_version
from transformers.integrations import hub_kernels
out["hub_names_imported"] = hasattr(hub_kernels, "get_kernel_hub")  # bound only when available
print(json.dumps(out))
"""


def test_transformers_sees_no_hub_kernels_and_runs_a_model(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "tiny-llama")],
        capture_output=True, text=True, timeout=300, cwd=repo,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["available"] is False
    assert out["hub_names_imported"] is False
    assert Path(out["kernels_file"]).resolve().parent == repo / "kernels"
    assert out["has_version"] is False
    assert out["no_metadata_probe"] == [True, "N/A"]
    assert out["shape"] == [2, 12, 96] and out["same"] and out["finite"]
    assert 0 < out["quant_err"] < 0.2


def test_the_installed_kernels_package_is_ours_outside_the_repo(tmp_path: Path) -> None:
    # From another directory (no repo root on sys.path) `import kernels` must still find this project's
    # package: Hugging Face's hub-kernels distribution, which transformers 5.25 requires, would shadow it
    # (hence pyproject's transformers < 5.25).
    repo = Path(__file__).resolve().parents[2]
    code = "import importlib.util as u, kernels; print(kernels.__file__, u.find_spec('kernels').origin)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = {Path(p).resolve().parent for p in proc.stdout.split()}
    assert found == {repo / "kernels"}, f"`import kernels` finds {found}, not this project's package"
