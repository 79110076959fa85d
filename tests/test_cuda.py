"""On a CUDA GPU, saliency statistics and every merge method give what the CPU gives (skipped without CUDA; run on a
lent GPU machine: `python -m pytest tests/test_cuda.py`, or `python tests/test_cuda.py` where pytest is absent)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import pytest

    pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
except ImportError:  # the GPU machine may lack pytest: __main__ below runs the checks
    pytest = None

TEXTS = [f"{a} plus {b} is {a + b}. " * (1 + a % 3) for a in range(12) for b in (3, 7)]


def _state(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_cuda_matches_cpu(tmp_path):
    from obim.bench.zoo.tiny import make_llama
    from obim.merging.merge import merge
    from obim.merging.methods import METHODS
    from obim.merging.saliency import compute_hdiag, save_hdiag

    base = make_llama(tmp_path / "base", 0, layers=2, hidden=128, head_dim=64)
    names = ["lm", "math", "code"]
    experts = {
        n: make_llama(tmp_path / n, i + 1, layers=2, hidden=128, head_dim=64, base=base) for i, n in enumerate(names)
    }
    hd = {}
    for n, d in experts.items():
        cpu, _ = compute_hdiag(str(d), TEXTS, max_length=64, batch_size=5, device="cpu", progress=False)
        gpu, meta = compute_hdiag(str(d), TEXTS, max_length=64, batch_size=5, device="cuda", progress=False)
        assert cpu.keys() == gpu.keys() and len(cpu) == 2 * 7 + 1
        for k in cpu:
            assert torch.allclose(cpu[k], gpu[k], rtol=2e-4, atol=1e-7), k
        hd[n] = tmp_path / f"hdiag-{n}.safetensors"
        save_hdiag(cpu, hd[n], meta)
    for method in sorted(METHODS):
        m = METHODS[method]
        models = []
        for n in names[: m.max_models]:  # slerp: two endpoints
            spec = {"name": n, "path": str(experts[n])}
            if m.retention_param == "retention":
                spec["retention"] = {"lm": 0.4, "math": 0.45, "code": 0.1}[n]
            if m.uses_saliency:
                spec["hdiag"] = str(hd[n])
            models.append(spec)
        cfg = {"method": method, "base_model": str(base), "models": models, "order": "rotation", "seed": 0}
        merge(cfg, tmp_path / f"{method}-cpu", device="cpu", progress=False)
        merge(cfg, tmp_path / f"{method}-cuda", device="cuda", progress=False)
        a, b = _state(tmp_path / f"{method}-cpu"), _state(tmp_path / f"{method}-cuda")
        assert a.keys() == b.keys()
        for k in a:
            # top-k selections may flip where two scores tie to float rounding: a few entries, never many
            differ = ((a[k].float() - b[k].float()).abs() > 1e-5).float().mean().item()
            assert differ <= 1e-3, f"{method} {k}: {differ:.2%} of entries differ between CPU and CUDA"
        print(f"{method}: CUDA merge matches CPU")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU")
    with tempfile.TemporaryDirectory() as tmp:
        test_cuda_matches_cpu(Path(tmp))
    print("ok")
