"""Text generation: greedy tokens against transformers' generate, TP2 against TP1, the sampling
rules, and `deepy.py generate.py` end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import generation_workers
from helpers import ROOT, run_cli, run_distributed
from megatron.checkpointing.hf import to_hf_model
from megatron.config import load_config
from megatron.config.schema import ModelConfig
from megatron.generation.generator import attention_mask, forward, generate, positions
from megatron.generation.run import encode, read_prompts
from megatron.generation.sampling import Sampling, sample, top_k_filter, top_p_filter
from megatron.model import GPTModel, layer_defs
from megatron.model.transformer import DecodeStep
from megatron.tokenizer.tokenizer import CharLevelTokenizer

V = 128  # a multiple of 128: no padded rows, so the transformers twin has the same vocabulary
PROMPTS = [[5, 9, 17, 33, 2, 8, 100], [7, 1], [60, 61, 62, 63], [44]]


def tiny_model(parallel: bool, **kw) -> tuple[ModelConfig, GPTModel]:
    m = ModelConfig(**{"pos_emb": "rotary", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                       "seq_length": 64, "rotary_pct": 0.25, "gpt_j_residual": parallel, "no_weight_tying": True,
                       "init_method": "small_init", "output_layer_init_method": "wang_init", **kw})
    return m, GPTModel(layer_defs(m, V, 256, 64, seed=3, vocab_size=V)).eval()


def hf_greedy(hf, prompts: list[list[int]], new: int, eod: int) -> list[list[int]]:
    """transformers' greedy continuation of left-padded prompts, cut after its first eod."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[eod] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                      eos_token_id=eod, pad_token_id=eod)[:, longest:].tolist()
    return [row[:row.index(eod) + 1] if eod in row else row for row in out]


@pytest.mark.parametrize("parallel", [True, False])
def test_greedy_equals_transformers_generate(parallel):
    pytest.importorskip("transformers")
    m, ours = tiny_model(parallel)
    hf = to_hf_model(m, ours, V, 256, 64, "eager").eval()

    def same_as_transformers(eod: int) -> list[list[int]]:
        reference = hf_greedy(hf, PROMPTS, 24, eod)
        for recompute in (False, True):
            got = generate(ours, PROMPTS, 24, eod=eod, vocab_size=V, max_positions=64, recompute=recompute)
            assert [c.tokens + [eod] * c.finished for c in got] == reference
        return reference

    first = same_as_transformers(V - 1)
    assert any(len(row) == 24 and V - 1 not in row for row in first)  # some row runs to the limit
    # Row 1's 4th greedy token as the end-of-text id: that row stops there, the others go on.
    second = same_as_transformers(first[1][3])
    assert len(second[1]) <= 4 and second[1][-1] == first[1][3]


@pytest.mark.parametrize("pos_emb", ["rotary", "learned"])
def test_padded_rows_see_what_an_unpadded_prompt_sees(pos_emb):
    """Each left-padded row's last logits equal the plain forward of that prompt alone (1e-5)."""
    _, ours = tiny_model(True, pos_emb=pos_emb)
    longest = max(map(len, PROMPTS))
    pad = torch.tensor([longest - len(p) for p in PROMPTS])
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in PROMPTS])
    with torch.no_grad():
        batched = forward(ours, tokens, DecodeStep(positions(pad, 0, longest), attention_mask(pad, 0, longest)), None)
        alone = torch.stack([ours(torch.tensor([p]))[0, -1] for p in PROMPTS])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_generation_stops_at_max_positions():
    _, ours = tiny_model(True)
    got = generate(ours, [[3] * 60, [4, 5]], 24, eod=V - 1, vocab_size=V, max_positions=64)
    assert [len(c.tokens) for c in got] == [4, 4]  # the longest row fills 64 positions


def test_tensor_parallel_generation_equals_single_process():
    for parallel_residual in (True, False):
        run_distributed(generation_workers.tp_generation_matches_single, 2, parallel_residual)


# --- sampling rules ---

def test_greedy_ignores_padded_vocabulary():
    logits = torch.tensor([[0.0, 3.0, 1.0, 9.0], [2.0, 0.0, 1.0, 9.0]])  # id 3 is padding
    assert sample(logits, 3, Sampling()).tolist() == [1, 0]
    draws = sample(logits[:1].expand(500, 4), 3, Sampling(temperature=5.0), torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1, 2}


def test_top_k_and_top_p_keep_exactly_the_specified_ids():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[True, False, True, False]]
    # The nucleus in order of probability: 0.5, 0.3, 0.15, 0.05; a token is kept while the mass
    # before it is below p.
    assert torch.isinf(top_p_filter(logits, 0.45)).tolist() == [[True, False, True, True]]
    assert torch.isinf(top_p_filter(logits, 0.75)).tolist() == [[True, False, True, False]]
    assert torch.isinf(top_p_filter(logits, 0.85)).tolist() == [[True, False, False, False]]
    assert not torch.isinf(top_p_filter(logits, 0.0)).any()
    draws = sample(logits.expand(2000, 4), 4, Sampling(temperature=1.0, top_p=0.75), torch.Generator().manual_seed(1))
    counts = torch.bincount(draws, minlength=4) / 2000
    assert counts[0] == counts[2] == 0
    assert counts[1].item() == pytest.approx(0.5 / 0.8, abs=0.04)  # renormalised over the nucleus
    draws = sample(logits.expand(2000, 4), 4, Sampling(temperature=1.0, top_k=1), torch.Generator().manual_seed(1))
    assert set(draws.tolist()) == {1}


def test_temperature_sharpens_and_flattens_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    for t in (0.5, 2.0):
        draws = sample(logits.expand(8000, 3), 3, Sampling(temperature=t), torch.Generator().manual_seed(2))
        want = torch.softmax(logits[0] / t, -1)
        got = torch.bincount(draws, minlength=3) / 8000
        torch.testing.assert_close(got, want, atol=0.02, rtol=0)
    assert math.isclose(torch.softmax(logits[0] / 0.5, -1)[0].item(), 0.36 / 0.46, rel_tol=1e-6)


def test_sampling_is_reproducible_with_a_seed():
    _, ours = tiny_model(True)
    params = Sampling(temperature=1.0, top_k=50, top_p=0.9)
    runs = [generate(ours, PROMPTS, 12, eod=V - 1, vocab_size=V, max_positions=64, sampling=params,
                     generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    greedy = generate(ours, PROMPTS, 12, eod=V - 1, vocab_size=V, max_positions=64)
    assert runs[0] != greedy


# --- generate.py as users run it ---

def test_prompts_split_at_prompt_end_and_cut_to_fit(tmp_path):
    (tmp_path / "p.txt").write_text("a b||\n||c||")
    assert read_prompts(str(tmp_path / "p.txt"), "||") == ["a b", "c"]  # blank prompts are skipped
    tok = CharLevelTokenizer()
    assert encode(tok, "abcdef", 4) == ([ord("d"), ord("e"), ord("f")], 3)  # room for one new token
    assert encode(tok, "", 64) == ([tok.eod], 0)  # unconditional: start after end-of-text



@pytest.mark.slow
def test_deepy_generate_from_a_trained_checkpoint(tmp_path, tiny):
    cfg = tiny(train_iters=2, checkpoint_factor=2, eval_interval=100)
    proc = run_cli("train.py", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prompts = ["def main(", "import", "", "class Foo:", "x = 1"]  # the blank line is skipped
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    gen = tmp_path / "gen.yml"
    out = tmp_path / "out" / "samples.jsonl"
    gen.write_text(json.dumps({
        "text_gen_type": "input-file", "sample_input_file": str(tmp_path / "prompts.txt"),
        "sample_output_file": str(out), "maximum_tokens": 12, "temperature": 0.0,
        "load": str(tmp_path / "run" / "ckpt"), "train_micro_batch_size_per_gpu": 2,
    }))
    # TP2 x 2 replicas (4 processes) from a TP1 checkpoint, against one process; the training
    # data is gone (generation must not need it).
    layout = tmp_path / "layout.yml"
    layout.write_text("model_parallel_size: 2\nnum_gpus: 4\nmaster_port: 29231\ndata_path: /nonexistent/data\n")
    proc = run_cli("deepy.py", "generate.py", cfg, str(gen), str(layout))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loaded the weights of iteration 2" in proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    proc = run_cli("generate.py", cfg, str(gen))
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == single
    assert [r["context"] for r in records] == [p for p in prompts if p]
    for r in records:
        assert set(r) == {"context", "text", "length", "finished"}
        assert 0 <= r["length"] <= 12 and (r["finished"] or r["length"] == 12) and isinstance(r["text"], str)


def test_config_errors_are_one_line(tmp_path, tiny):
    proc = run_cli("generate.py", tiny(), str(_yml(tmp_path, text_gen_type="file")))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: text_gen_type is 'file'; choose one of 'unconditional', 'input-file', 'interactive'")
    proc = run_cli("generate.py", tiny(), str(_yml(tmp_path, text_gen_type="input-file",
                                                   sample_input_file=str(tmp_path / "none.txt"))))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: sample_input_file: file not found: {tmp_path / 'none.txt'}"


def test_unconditional_from_initial_weights_warns(tmp_path, tiny):
    out = tmp_path / "u.jsonl"
    proc = run_cli("generate.py", tiny(), str(_yml(tmp_path, text_gen_type="unconditional", num_samples=3,
                                                   maximum_tokens=5, temperature=1.0, sample_output_file=str(out))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: `load` is not set: generating from the initial weights of seed 1234" in proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and all(r["context"] == "" and r["length"] <= 5 for r in records)


def test_interactive_completes_each_prompt_until_stop(tmp_path, tiny):
    """generate.py reading prompts from its terminal prints what generate() gives in-process."""
    cfg_files = [tiny(), _yml(tmp_path, text_gen_type="interactive", maximum_tokens=6)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "generate.py", *cfg_files], cwd=ROOT, env=env, input=b"import\nstop\n",
                          capture_output=True, timeout=600)  # bytes: a generated \r must stay \r
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout.decode()
    cfg = load_config(cfg_files, require_files=False, vocab_size=257)
    d, tok = cfg.derived, CharLevelTokenizer()
    model = GPTModel(layer_defs(cfg.model, d.padded_vocab_size, d.intermediate_size, d.max_position_embeddings,
                                cfg.training.seed, vocab_size=d.vocab_size))
    want, = generate(model, [tok.tokenize("import")], 6, tok.eod, 257, d.max_position_embeddings)
    prompt = "prompt ('stop' to quit) >>> "
    assert stdout.count(prompt) == 2
    assert stdout.split(prompt)[1] == tok.detokenize(want.tokens) + "\n"


def _yml(tmp_path, **values) -> str:
    path = tmp_path / "gen.yml"
    path.write_text(json.dumps(values))
    return str(path)
