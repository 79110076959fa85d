"""A merge evaluated in place: streamed into one evaluator's weights (no merged model on disk) gives the scores and
per-sample outputs of the same merge written and loaded from disk; what cannot be loaded in place is refused."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_llama
from safetensors.torch import load_file

from obim.merging.errors import ObimError


def _zoo(tmp_path: Path, **kw) -> dict:
    base = make_llama(tmp_path / "base", 0, **kw)
    a = make_llama(tmp_path / "a", 1, base=base, scale=0.01, **kw)
    b = make_llama(tmp_path / "b", 2, base=base, scale=0.01, **kw)
    return {
        "method": "ties",
        "base_model": str(base),
        "models": [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}],
        "parameters": {"density": 0.3},
    }


@pytest.mark.parametrize("tie", [False, True])
def test_copy_in_place_gives_the_model_loaded_from_the_written_merge(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    from obim.bench.evaluation import copy_in_place
    from obim.merging.merge import MergeStream, merge

    cfg = _zoo(tmp_path, tie=tie)
    merge(cfg, tmp_path / "out", progress=False)
    disk = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(cfg["base_model"], dtype=torch.float32)
    with MergeStream(cfg) as stream:
        copy_in_place(model, stream)
    got, want = model.state_dict(), disk.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert ("lm_head.weight" in written) is not tie  # a tied head is set through the embedding it shares
    base = load_file(Path(cfg["base_model"]) / "model.safetensors")
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_copy_in_place_refuses_names_the_model_lacks_or_leaves_unset(tmp_path):
    from transformers import AutoModelForCausalLM

    from obim.bench.evaluation import copy_in_place

    cfg = _zoo(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(cfg["base_model"], dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def stream(*plans):
        return SimpleNamespace(plans=[SimpleNamespace(name=n, out_shape=s) for n, s in plans], __iter__=None)

    with pytest.raises(ObimError, match=r"^tensor model\.nope\.weight: not a parameter of the LlamaForCausalLM"):
        copy_in_place(model, stream(("model.nope.weight", (2,))))
    with pytest.raises(ObimError, match=r"^tensor model\.norm\.weight: shape \(3,\), the LlamaForCausalLM"):
        copy_in_place(model, stream(("model.norm.weight", (3,))))
    emb = model.state_dict()["model.embed_tokens.weight"].shape
    with pytest.raises(ObimError, match=r"^tensor lm_head\.weight of the LlamaForCausalLM .*: the merge has no tensor"):
        copy_in_place(model, stream(*((k, tuple(v.shape)) for k, v in before.items() if k != "lm_head.weight")))
    assert emb == before["model.embed_tokens.weight"].shape
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before any copy


def test_in_place_refusal_names_what_differs_from_the_base(tmp_path):
    from obim.bench.stages import in_place_refusal
    from obim.merging.config import load_config

    cfg = _zoo(tmp_path / "same")
    why, tensors, size = in_place_refusal(load_config(cfg), {"dtype": "float32"})
    n = len(load_file(Path(cfg["base_model"]) / "model.safetensors"))
    assert (
        why is None
        and tensors == n
        and size
        == sum(t.numel() * t.element_size() for t in load_file(Path(cfg["base_model"]) / "model.safetensors").values())
    )
    why, *_ = in_place_refusal(load_config({**cfg, "dtype": "bfloat16"}), {})
    assert why == "dtype bfloat16 with the evaluator's dtype left to the model's config"
    assert in_place_refusal(load_config({**cfg, "dtype": "bfloat16"}), {"dtype": "float32"})[0] is None
    why, *_ = in_place_refusal(load_config(cfg), {"dtype": "float16", "tensor_parallel_size": 2})
    assert why == "eval.model_args.tensor_parallel_size=2 runs vLLM's workers in processes of their own"
    assert in_place_refusal(load_config(cfg), {"tensor_parallel_size": 1})[0] is None
    base = make_llama(tmp_path / "v" / "base", 0)
    more = make_llama(tmp_path / "v" / "more", 1, base=base, vocab=66, extra_tokens=2)
    cfg = {"method": "ta", "base_model": str(base), "models": [{"name": "m", "path": str(more)}]}
    why, *_ = in_place_refusal(load_config(cfg), {"dtype": "float32"})
    assert why is not None and why.startswith("its vocabulary rows differ from the base's")


def _samples(measured: dict, folder: Path) -> dict:
    """Each task's per-sample records as lm-eval logged them: the responses and the metric per item."""
    out = {}
    for t, leaves in measured["samples"].items():
        for leaf, e in leaves.items():
            recs = [json.loads(x) for x in (folder / e["file"]).read_text().splitlines()]
            out[(t, leaf)] = [(r["doc_id"], r["filtered_resps"], r[e["metric"].split(",")[0]]) for r in recs]
    return out


TASKS = ["toy_mmlu", "toy_gsm8k"]  # a log-likelihood task and a generation task


def _merges(zoo: Path) -> list[dict]:
    models = [{"name": n, "path": str(zoo / "sft" / n)} for n in ("lm", "math", "code")]
    base = str(zoo / "sft" / "base")
    return [
        {"method": "ta", "base_model": base, "models": models, "parameters": {"lambda": 0.8}},
        {"method": "ties", "base_model": base, "models": models, "parameters": {"density": 0.3}},
    ]


def test_hf_in_place_matches_the_disk_path_item_by_item_with_one_evaluator(quick_zoo, tmp_path):
    from obim.bench import evaluation
    from obim.bench.evaluation import InPlace, measure_model
    from obim.merging.merge import merge

    base = str(quick_zoo / "sft" / "base")
    opts = {"limit": 8, "batch_size": 8}
    engines = []
    for i, cfg in enumerate(_merges(quick_zoo)):
        merge(cfg, tmp_path / f"m{i}", progress=False)
        disk = measure_model(tmp_path / f"m{i}", TASKS, outputs_dir=tmp_path / f"d{i}", **opts)
        live = measure_model(InPlace(cfg, base, base), TASKS, outputs_dir=tmp_path / f"p{i}", **opts)
        engines.append(id(next(iter(evaluation._ENGINE.values()))))
        assert live["scores"] == disk["scores"] and live["stderr"] == disk["stderr"] and live["n"] == disk["n"]
        assert _samples(live, tmp_path / f"p{i}") == _samples(disk, tmp_path / f"d{i}")
        assert live["load_s"] > 0 and "load_s" not in disk
    assert engines[0] == engines[1]  # the second merge went into the first one's evaluator
    alone = measure_model(base, TASKS, outputs_dir=tmp_path / "base", **opts)  # the merges changed the weights
    assert _samples(alone, tmp_path / "base") != _samples(live, tmp_path / "p1")


def test_free_device_ends_the_evaluators_before_gpu_work_only(monkeypatch):
    """A GPU's evaluators (the vLLM engine holds most of its memory) are ended before saliency or a merge computes
    there; on the CPU they are kept for the next job."""
    from obim.bench import evaluation

    closed = []
    server = SimpleNamespace(close=lambda: closed.append(1) or evaluation._SERVER.clear())
    monkeypatch.setitem(evaluation._SERVER, "server", server)
    monkeypatch.setitem(evaluation._ENGINE, "hf-key", object())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    evaluation.free_device("cpu")
    assert closed == [] and "hf-key" in evaluation._ENGINE
    evaluation.free_device("cuda:0")
    assert closed == [1] and evaluation._ENGINE == {} and evaluation._SERVER == {}


def test_the_engine_server_is_told_the_requesting_jobs_log(tmp_path):
    """A sweep job's output goes to its own log file; the kept engine writes each request's output there too."""
    import subprocess
    import sys

    code = "from obim.bench.evaluation import _log_file; print(_log_file())"
    log = tmp_path / "sweep.log"
    with open(log, "w") as err:
        out = subprocess.run([sys.executable, "-c", code], stderr=err, capture_output=False, stdout=subprocess.PIPE)
    assert out.stdout.decode().strip() == str(log)
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert piped.stdout.strip() == "None"  # a pipe (a console, a CI log): left as it is


def test_vllm_load_hands_every_merged_tensor_to_the_reload_then_drops_the_prefix_cache(tmp_path):
    """The order the engine needs: the merge's tensors through vLLM's in-place reload (its loader maps the
    checkpoint's names), then the prefix cache dropped (generation requests read it: KV blocks of the old weights)."""
    from obim.bench.evaluation import load_merge
    from obim.merging.merge import MergeStream

    cfg = _zoo(tmp_path)
    calls = []

    def rpc(method, kwargs):
        calls.append((method, [(n, t.clone()) for n, t in kwargs["weights_iterator"]]))

    llm = SimpleNamespace(collective_rpc=rpc, reset_prefix_cache=lambda: calls.append(("reset_prefix_cache", None)))
    assert load_merge(SimpleNamespace(model=llm), "vllm", {"config": cfg, "merge_device": "cpu"}) > 0
    assert [c[0] for c in calls] == ["reload_weights", "reset_prefix_cache"]
    with MergeStream(cfg) as stream:
        want = list(stream)
    got = calls[0][1]
    assert [n for n, _ in got] == [n for n, _ in want]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want, strict=True))


def test_a_model_directory_frees_the_gpu_of_kept_evaluators_first(monkeypatch, tmp_path):
    """The engine kept for merges holds most of a GPU: the base's and experts' evaluations (a new engine each) would
    not start beside it."""
    from obim.bench import evaluation

    freed, ran = [], []
    monkeypatch.setattr(evaluation, "free_device", freed.append)
    monkeypatch.setattr(evaluation, "_run", lambda r: ran.append(r["model_dir"]) or {"scores": {}})
    evaluation.measure_model(tmp_path / "m", ["toy_mmlu"], device="cuda:0")
    assert freed == ["cuda:0"] and ran == [str(tmp_path / "m")]
    evaluation.measure_model(InPlaceStub := evaluation.InPlace({}, "b", "b"), ["toy_mmlu"], device="cuda:0")
    assert freed == ["cuda:0"] and ran[-1] == InPlaceStub.arch_dir  # a merge goes into the kept evaluator


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_a_load_that_fails_midway_spoils_a_vllm_engine_only(monkeypatch, backend):
    """vLLM's layer-wise reload left midway mixes two merges' weights: that engine is dropped (the server child
    replies and ends); an hf model has every parameter set again by the next merge, so it is kept."""
    from obim.bench import evaluation

    def fail(*a):
        raise ObimError("tensor x: task vector of model 'a' has NaN or Inf entries")

    monkeypatch.setattr(evaluation, "_lm", lambda r: evaluation._ENGINE.setdefault("k", object()))
    monkeypatch.setattr(evaluation, "load_merge", fail)
    r = {"backend": backend, "merge": {"config": {}}, "model_dir": "b", "outputs_dir": None, "tasks": []}
    with pytest.raises(ObimError, match="NaN or Inf") as e:
        evaluation._run(r)
    assert isinstance(e.value, evaluation.SpoiledEngine) is (backend == "vllm")
    assert ("k" in evaluation._ENGINE) is (backend == "hf")
    evaluation._ENGINE.clear()


def test_the_engine_server_answers_a_crash_with_one_line_and_ends_at_once(tmp_path):
    """Closing the server does not wait out the grace period (its exit reaped before its group is ended); a server
    that crashed on a request is reported in one line and replaced by the next request."""
    import time

    from obim.bench import evaluation

    server = evaluation.EngineServer("k")
    t0 = time.perf_counter()
    server.close(grace_s=60)  # its start-up (imports, a few seconds) and its exit, not the grace period
    assert time.perf_counter() - t0 < 30 and server.proc.returncode == 0
    req = {
        "model_dir": str(tmp_path / "none"),
        "merge": {"config": {}, "arch_dir": str(tmp_path / "none"), "tokenizer_dir": str(tmp_path / "none")},
        "tasks": ["toy_mmlu"],
        "backend": "hf",
        "batch_size": 1,
        "limit": 1,
        "device": "cpu",
        "model_args": {},
        "num_fewshot": {},
        "outputs_dir": None,
        "allow_code": False,
    }
    server = evaluation._SERVER["server"] = evaluation.EngineServer("k")
    with pytest.raises(ObimError, match=r"^vllm evaluation of a merge of .*none failed \(exit status 1; see above\)$"):
        server.ask(req)
    assert "server" not in evaluation._SERVER and server.proc.returncode == 1


def test_an_in_place_merge_takes_the_tokenizer_its_written_folder_would(tmp_path):
    """The evaluator built for an in-place merge reads the tokenizer obim-merge would copy: the base's, or the
    `tokenizer_source` model's."""
    from obim.merging.config import load_config

    cfg = _zoo(tmp_path)
    assert load_config(cfg).tokenizer_path == cfg["base_model"]
    assert load_config({**cfg, "tokenizer_source": "b"}).tokenizer_path == cfg["models"][1]["path"]
