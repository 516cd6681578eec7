"""GPT-NeoX's own configs load unchanged; its keys, defaults and derivation rules hold here.

The YAML files under neox_configs/ are GPT-NeoX's published ones (README.md there names their source).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import deepy
from helpers import run_cli
from megatron.config import load_config
from megatron.config.loader import known_keys
from megatron.model.gpt import count_parameters
from megatron.model.sizing import meta_model

HERE = Path(__file__).parent
NEOX = HERE / "neox_configs"
LOCAL = str(NEOX / "local_setup.yml")
LLAMA_TRAIN = str(NEOX / "llama" / "train_config.yml")
TOP_LEVEL = ["19M", "49M", "125M", "350M", "760M", "800M", "1-3B", "2-7B", "6-7B", "13B", "20B", "175B"]
PYTHIA = {"70M": 70_426_624, "160M": 162_322_944, "410M": 405_334_016, "1-4B": 1_414_647_808,
          "2-8B": 2_775_208_960, "6-9B": 6_857_302_016, "12B": 11_846_072_320}
LLAMA = ["llama/7B", "llama/13B", "llama/30B", "llama/65B", "llama2/7B", "llama2/13B", "llama2/70B"]
# Configs that ask for something this framework refuses on purpose, and the one line it prints.
REFUSED = {
    "llama2/codellama_34B": "mlp_type: llama asks for GPT-NeoX's former Llama MLP switch, since replaced by "
                            "activation: swiglu, intermediate_size: 8 x hidden_size, mlp_multiple_of: 256, which "
                            "this framework does not implement (leave it at regular)",
    "mistral/7B": "sliding_window_width: 4096 asks for sliding-window attention, which this framework does not "
                  "implement (remove it)",
}


def files(name: str) -> list[str]:
    """What a GPT-NeoX user passes: the model config, Llama's training settings, local_setup.yml."""
    extra = [LLAMA_TRAIN] if name.startswith(("llama", "mistral")) else []
    return [str(NEOX / f"{name}.yml"), *extra, LOCAL]


def overlay(tmp_path: Path, values: dict) -> str:
    path = tmp_path / "overlay.yml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


# fp16 at ZeRO stage 0, which runs as stage 1 (derived.zero_stage), and the dry run says so.
STAGE_0_FP16 = ["pythia/14M", "pythia/31M"]


@pytest.mark.parametrize("name", TOP_LEVEL + [f"pythia/{n}" for n in PYTHIA] + STAGE_0_FP16 + LLAMA + sorted(REFUSED))
def test_dry_run_of_every_published_config(name, capsys, monkeypatch):
    """`deepy.py --dry-run train.py X.yml local_setup.yml`, in-process, as on a CPU-only machine
    (one process per GPU would make the layout depend on where the test runs)."""
    import megatron.launcher.environment as environment

    monkeypatch.setattr(environment, "gpus_on_this_node", lambda: 0)
    code = deepy.main(["--dry-run", "train.py", *files(name)])
    out, err = capsys.readouterr()
    if name in REFUSED:
        assert (code, err) == (2, f"config error: {REFUSED[name]}\n")
    else:
        assert code == 0, err
        assert "parallel layout: tensor" in out and err == ""
        promoted = "ZeRO stage 0 with fp16 runs as stage 1: the same updates" in out
        assert promoted == (name in STAGE_0_FP16)


@pytest.mark.parametrize("name, total", PYTHIA.items())
def test_pythia_plans_the_published_parameter_counts(tmp_path, name, total):
    """Pythia's 20B_tokenizer.json has 50,277 entries; the dry run does not read it, so the test says so."""
    cfg = load_config(files(f"pythia/{name}") + [overlay(tmp_path, {"vocab_size": 50277})], require_files=False)
    assert count_parameters(meta_model(cfg)) == total
    assert cfg.derived.padded_vocab_size == (50688 if name == "12B" else 50432 if name == "6-9B" else 50304)


def test_llama_7b_plans_metas_parameter_count(tmp_path):
    # The stored copy does not set use_bias_in_mlp (GPT-NeoX's default: true); Meta's Llama has no MLP biases.
    extra = overlay(tmp_path, {"vocab_size": 32000, "use_bias_in_mlp": False})
    cfg = load_config(files("llama/7B") + [extra], require_files=False)
    assert (cfg.derived.intermediate_size, count_parameters(meta_model(cfg))) == (11008, 6_738_415_616)


def test_llama2_70b_plans_metas_parameter_count(tmp_path):
    """Grouped-query attention (8 key/value heads) and the gated MLP rule: 86016 -> 28672."""
    extra = overlay(tmp_path, {"vocab_size": 32000, "use_bias_in_mlp": False})
    cfg = load_config(files("llama2/70B") + [extra], require_files=False)
    assert (cfg.derived.intermediate_size, cfg.derived.num_kv_heads) == (28672, 8)
    assert count_parameters(meta_model(cfg)) == 68_976_648_192


def test_dry_run_20b_as_a_subprocess(tmp_path):
    # num_gpus 8: the layout GPT-NeoX trained with, whatever accelerators the test machine has.
    proc = run_cli("deepy.py", "--dry-run", "train.py", *files("20B"), overlay(tmp_path, {"num_gpus": 8}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "parallel layout: tensor 2 x pipeline 4 x data 1 = world size 8" in proc.stdout
    assert "vocabulary: " not in proc.stdout  # GPT-NeoX's 20B.yml states no vocab_size; planning needs it


def test_every_gpt_neox_key_is_known():
    neox_keys = [k for k in (HERE / "neox_keys.txt").read_text().splitlines() if not k.startswith("#")]
    assert len(neox_keys) == 318
    assert [k for k in neox_keys if k not in known_keys()] == []
    docs = (HERE.parents[1] / "docs" / "config.md").read_text()
    assert [k for k in neox_keys if f"| `{k}` |" not in docs] == []
