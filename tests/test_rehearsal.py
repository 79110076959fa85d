"""The rehearsal of the real presets (obim.bench.rehearsal): the stand-ins keep the real architectures, and one
preset (Table 1, two methods, one of them OBIM) runs end to end on CPU through the real code path against the
offline mirror, every column scored or marked missing with its reason."""

from __future__ import annotations

import json
import random

import pytest
import torch

from obim.bench.rehearsal import standins as S


def test_standin_config_keeps_real_ratios():
    """Heads of 32, the real MLP ratio and KV grouping, every real config key; only the sizes shrink."""
    llama = S.standin_config(S.LLAMA2_13B, S.LLAMA_SIZE, 500)
    assert set(S.LLAMA2_13B) <= set(llama)
    assert llama["hidden_size"] == 128 and llama["num_attention_heads"] == 4
    assert llama["num_key_value_heads"] == 4  # Llama-2-13B: multi-head attention
    assert llama["intermediate_size"] == round(13824 / 5120 * 128) == 346
    assert llama["torch_dtype"] == "float16" and llama["max_position_embeddings"] == 4096
    qwen = S.standin_config(S.QWEN2_7B, S.QWEN_SIZE, 640)
    assert qwen["num_attention_heads"] // qwen["num_key_value_heads"] == 28 // 4  # grouped-query attention
    assert qwen["hidden_size"] == 224 and qwen["intermediate_size"] == round(18944 / 3584 * 224) == 1184
    assert qwen["rope_theta"] == 1e6 and qwen["torch_dtype"] == "bfloat16" and qwen["vocab_size"] == 640


def _texts(n: int = 300) -> list[str]:
    rng = random.Random(0)
    words = [
        "the",
        "river",
        "garden",
        "answer",
        "question",
        "code",
        "def",
        "return",
        "print",
        "value",
        "number",
        "sum",
        "list",
    ]
    return [" ".join(rng.choice(words) for _ in range(10)) + f" {i} + {i} = {2 * i}" for i in range(n)]


def test_llama_tokenizer_is_llama2_shaped():
    """<unk> 0, <s> 1, </s> 2, the byte tokens at 3..258 (fallback for unseen characters), BOS added."""
    tok = S.llama_tokenizer(_texts(), 600)
    assert [tok.convert_ids_to_tokens(i) for i in (0, 1, 2, 3, 258)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    ids = tok("the river 答").input_ids
    assert ids[0] == 1 and tok.unk_token_id not in ids  # BOS; a character never seen falls back to bytes
    assert tok.decode(ids, skip_special_tokens=True) == "the river 答"


def test_qwen_tokenizer_is_byte_level_with_chatml_specials():
    tok = S.qwen2_tokenizer(_texts(), 600)
    assert tok.eos_token == "<|endoftext|>"
    ids = [tok.convert_tokens_to_ids(t) for t in S.QWEN_SPECIALS]
    assert len(set(ids)) == 3 and min(ids) >= 256  # each its own token, after the byte symbols
    assert tok.convert_ids_to_tokens(ids) == S.QWEN_SPECIALS
    ids = tok("the river 答").input_ids
    assert tok.decode(ids) == "the river 答" and ids[0] != tok.eos_token_id  # no BOS, as Qwen2's
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_code_expert_gets_one_pad_row_the_mean(tmp_path):
    """Alpaca's resize: one [PAD] token more than the base, its rows the mean of the others, saved as .bin shards."""
    tok = S.llama_tokenizer(_texts(), 600)
    cfg = S.standin_config(S.LLAMA2_13B, S.LLAMA_SIZE, len(tok))
    model = S._new("LlamaForCausalLM", cfg, 0)
    n = len(tok)
    emb = model.get_input_embeddings().weight.detach().clone()
    S.add_pad_row(model, tok)
    assert len(tok) == n + 1 and tok.pad_token == "[PAD]" and tok.pad_token_id == n
    w = model.get_input_embeddings().weight.detach()
    assert w.shape[0] == n + 1 and torch.allclose(w[n], emb.mean(0), atol=1e-6)
    out = S.save_checkpoint(model, tok, tmp_path / "code", cfg, "bin")
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ]
    from obim.merging.checkpoint import open_checkpoint

    ck = open_checkpoint(str(out))
    assert ck.tensors["model.embed_tokens.weight"].shape == (n + 1, 128)
    assert ck.tensors["model.embed_tokens.weight"].dtype == torch.float16
    ck.release()


def test_qwen_standin_has_biases_and_gqa(tmp_path):
    tok = S.qwen2_tokenizer(_texts(), 600)
    cfg = S.standin_config(S.QWEN2_7B, S.QWEN_SIZE, 640)
    model = S._new("Qwen2ForCausalLM", cfg, 0)
    sd = model.state_dict()
    assert sd["model.layers.0.self_attn.q_proj.bias"].shape == (224,)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (32, 224)  # one KV head of 32
    assert "model.layers.0.self_attn.o_proj.bias" not in sd
    out = S.save_checkpoint(model, tok, tmp_path / "q", cfg, "safetensors")
    assert (out / "model.safetensors.index.json").is_file()
    saved = json.loads((out / "config.json").read_text())
    assert saved["torch_dtype"] == "bfloat16" and saved["rope_theta"] == 1e6  # the hub's key names
    assert set(S.QWEN2_7B) <= set(saved)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)  # transformers reads the hub's keys
    assert loaded.dtype == torch.bfloat16 and loaded.config.num_key_value_heads == 1


@pytest.mark.slow
def test_rehearsal_of_table1_runs_the_real_path(tmp_path):
    """`make rehearse` for Table 1 with two methods (TA and OBIM), eval.limit=2: the mirror is built, the preset's
    dry run finds every input in it, the run scores every benchmark of llama2_13b_sft for the merged and the
    individual models (AlpacaEval marked missing: it needs a judge), and the tables are written in the
    rehearsal's own folder. A few minutes on 2 cores, most of it building the mirror."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from obim.bench import conf_dir
    from obim.bench.rehearsal.run import main

    out = tmp_path / "rehearsal"
    experiments = Path(__file__).resolve().parents[1] / "experiments"
    args = ["--out", str(out), "--presets", "table1", "--search-trials", "0", "method=ta,obim", "keep_merged=true"]
    rc = main(args, experiments)  # the merged models kept: their vocabulary is checked below
    assert rc == 0, (out / "logs" / "table1.log").read_text()[-3000:]

    sweep = out / "multirun" / "llama2_13b_sft"
    plans = sorted(sweep.glob("*/plan.json"))
    results = [json.loads(f.read_text()) for f in sorted(sweep.glob("*/result.json"))]
    assert len(plans) == 2 and sorted(r["plan"]["method"] for r in results) == ["obim", "ta"]
    for f in plans:
        plan = json.loads(f.read_text())
        assert plan["missing"] == []
        assert any("layoric/llama-2-13b-code-alpaca" in i for i in plan["inputs"])
    exp = OmegaConf.load(Path(conf_dir()) / "experiment" / "llama2_13b_sft.yaml")
    tasks = set(exp.benchmarks)
    for r in results:
        for who, scores in [("merged", r["scores"]), *((n, v["scores"]) for n, v in r["individual"].items())]:
            assert set(scores) == tasks, who
            unscored = {t for t, v in scores.items() if v is None}
            assert unscored == {"obim_alpaca_eval"}, (who, unscored)
            assert all(0 <= v <= 100 for v in scores.values() if v is not None)
    assert set(results[0]["individual"]) == {"base", "lm", "math", "code"}
    table = (out / "results" / "llama2_13b_sft" / "table1.md").read_text()
    assert "| TA " in table and "| OBIM " in table
    summary = (out / "results" / "rehearsal.md").read_text()
    assert "obim_alpaca_eval (merged, base, code, lm, math): AlpacaEval's win rate needs an LLM judge" in summary
    assert "| table1 | 0 |" in summary and "| 2 / 0 |" in summary  # both jobs run here, none reused
    from obim.bench.rehearsal.mirror import mirror_dir

    merged = next(r for r in results if r["plan"]["method"] == "obim")["merged_dir"]
    hub = mirror_dir(out) / "hub" / "models--meta-llama--Llama-2-13b-hf" / "snapshots"
    base_rows = json.loads(next(hub.glob("*/config.json")).read_text())["vocab_size"]
    # two experts carry an extra [PAD] row: the merge keeps the base's vocabulary
    assert json.loads((Path(merged) / "config.json").read_text())["vocab_size"] == base_rows
