"""deepy.py as a user runs it: the dry-run plan and errors before launch."""

from __future__ import annotations

from helpers import ROOT, run_cli


def test_dry_run_20b_plan():
    proc = run_cli("deepy.py", "--dry-run", "train.py", "configs/20B.yml", "configs/local_setup.yml")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "parameters: 20,554,567,680 (20554567680)" in out
    # The recipe that fails in GPT-NeoX: both files set the paths, the later one wins, visibly.
    assert ("override vocab_file: './20B_checkpoints/20B_tokenizer.json' (configs/20B.yml) -> "
            "'data/20B_tokenizer.json' (configs/local_setup.yml)") in out
    overridden = [line.split(":")[0] for line in out.splitlines() if line.startswith("override ")]
    assert sorted(overridden) == sorted(f"override {k}" for k in (
        "data_path", "vocab_file", "save", "load", "tensorboard_dir", "log_dir"))
    assert "parallel layout: tensor 2 x pipeline 4 x data 12 = world size 96" in out
    assert "batch: micro 4 x grad-accum 32 x data 12 = 1536 sequences (3,145,728 tokens) per step" in out
    assert "launching" not in out
    # The plan as README "Training on GPUs" prints it, line for line and to the hundredth of a GiB.
    plan = [
        "parallel layout: tensor 2 x pipeline 4 x data 12 = world size 96 (12 node(s) x 8 processes)",
        "batch: micro 4 x grad-accum 32 x data 12 = 1536 sequences (3,145,728 tokens) per step, 150,000 steps",
        "vocabulary: 50,277 -> padded 50,432",
        "parameters: 20,554,567,680 (20554567680)",
        "parameters per GPU by pipeline stage: 2,646,985,728, 2,492,058,624, 2,492,058,624, 2,646,998,016",
        "memory per GPU, heaviest stage (stage 1 of 4; fp16, ZeRO-1, activation checkpointing on):",
        "  weights                  4.93 GiB",
        "  gradients                4.93 GiB",
        "  optimizer state          2.47 GiB",
        "  activations              4.12 GiB   (4 micro-batch(es) in flight; without checkpointing: 43.31 GiB)",
        "  backward working set     1.27 GiB   (recomputed chunk and gradients in flight)",
        "  logits and loss          0.00 GiB   (live at once with the working set: the larger counts)",
        "  pipeline buffers         0.09 GiB   (the pipeline engine's send/receive and output buffers)",
        "  communication buckets    4.69 GiB",
        "  total                   22.50 GiB",
        "  fits a NVIDIA A100-SXM4-40GB (39.59 GiB, keeping 10% for the allocator and libraries: headroom 13.13 GiB)",
    ]
    lines = out.splitlines()
    start = lines.index(plan[0])
    assert lines[start:start + len(plan)] == plan
    readme = (ROOT / "README.md").read_text().split("For the 20B it prints", 1)[1].split("```", 2)[1]
    assert readme.strip("\n").splitlines() == plan


def test_dry_run_without_checkpointing_does_not_fit(tmp_path):
    extra = tmp_path / "no_ckpt.yml"
    extra.write_text("checkpoint_activations: false\n")
    proc = run_cli("deepy.py", "--dry-run", "train.py", "configs/20B.yml", "configs/local_setup.yml", str(extra))
    assert proc.returncode == 0
    assert "override checkpoint_activations: True (configs/20B.yml) -> False" in proc.stdout
    assert "does NOT fit a NVIDIA A100-SXM4-40GB" in proc.stdout


def test_launch_checks_files_first():
    proc = run_cli("deepy.py", "train.py", "configs/20B.yml", "configs/local_setup.yml")
    assert proc.returncode == 2
    assert "config error: vocab_file: file not found: data/20B_tokenizer.json" in proc.stderr


def test_impossible_layout_names_the_numbers(tiny):
    proc = run_cli("deepy.py", "train.py", tiny(model_parallel_size=2, num_gpus=3))
    assert proc.returncode == 2
    assert "config error: world size 3 is not divisible by model_parallel_size 2 x pipe_parallel_size 1 = 2" in proc.stderr


def test_unset_master_port_is_a_free_one(tiny):
    """Two runs side by side on one machine must not both take 29500: unset, the port is one the
    kernel hands out as free (binding it proves it was); set, it is used as given; across nodes
    every node must agree without talking, so 29500."""
    import socket

    from megatron.config import load_config
    from megatron.launcher.launch import plan_launch

    def port(**kw) -> int:
        plan = plan_launch(load_config([tiny(**kw)], require_files=False), "train.py", [])
        return plan.master_port or int(plan.command[plan.command.index("--master_port") + 1])

    first, second = port(), port()
    for chosen in (first, second):
        with socket.socket() as s:
            s.bind(("127.0.0.1", chosen))
    assert port(master_port=29123) == 29123
    assert port(num_nodes=2, hostfile="hosts") == 29500
