"""Past one device: ``train_sft.py --shard_base`` on a base sharded over two CPU processes (gloo), launched with the
committed accelerate config, and its refusals.

The run shards a small random Llama with FSDP2 (Transformers' ``distributed_config``), builds the feature cache
with both processes, trains the head data-parallel and evaluates with both processes. Each process then records
its head and the logits of fixed ids from the sharded model (a script written below wraps ``train_sft.main``).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import train_sft
from backattn import LlamaBackwardAttentionForCausalLM, offline
from backattn.errors import BackattnValueError

ROOT = Path(__file__).resolve().parents[1]

RECORDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    import train_sft
    from backattn.sharding import is_sharded, local_tensor

    trainers, train = [], train_sft.HeadTrainer.train

    def keep(self, *args, **kwargs):
        trainers.append(self)
        return train(self, *args, **kwargs)

    train_sft.HeadTrainer.train = keep
    train_sft.main(sys.argv[2:])
    model = trainers[0].model
    block = model.model.layers[0].mlp.up_proj.weight  # resharded after every forward
    record = {"head." + k: v.detach().contiguous() for k, v in model.heads.state_dict().items()}
    record["rows"] = torch.tensor([local_tensor(block).shape[0], block.shape[0]])
    record["sharded"] = torch.tensor(int(is_sharded(model)))
    record["ids"] = torch.tensor([[1, 5, 9, 200, 3000, 17], [40, 2, 2, 8, 11, 12]])
    model.eval()
    with torch.no_grad():  # every process at once: the sharded base gathers its weights as it runs
        record["logits"] = model(input_ids=record["ids"]).logits.contiguous()
    save_file(record, Path(sys.argv[1]) / f"rank{dist.get_rank()}.safetensors")
    """
)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A small random Llama (tied embeddings, as SmolLM2) with the real GPT-2 tokenizer beside it."""
    path = tmp_path_factory.mktemp("tiny-llama")
    offline.gpt2_tokenizer().save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50257, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=50256,
        eos_token_id=50256,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def arguments(model_dir, data, tmp_path, **overrides):
    options = {
        "model_name_or_path": str(model_dir), "dataset": str(data), "eval_size": "8",
        "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), "max_steps": "4",
        "save_steps": "4", "eval_strategy": "no", "logging_steps": "1", "per_device_train_batch_size": "4",
        "learning_rate": "0.03", "warmup_steps": "0", "num_generation_examples": "2", "max_new_tokens": "4",
        "max_length": "96", "disable_tqdm": "true",
    }  # fmt: skip
    options.update(overrides)
    return [item for key, value in options.items() for item in (f"--{key}", value)]


def test_a_sharded_base_trains_a_whole_head_on_two_processes(tiny_llama_dir, math_jsonl, tmp_path):
    """Two CPU processes under `accelerate launch --config_file examples/accelerate/sharded_base.yaml`: the base's
    weights are DTensor shards (half the rows each), the head is the same on both processes after training, and
    the saved head on a plain, unsharded model gives the logits the sharded model gave.

    Checked by hand as well (not here, it costs a second launch): the same run without --shard_base (DDP, the
    base whole on each process) trains bit-identical head weights and builds the same feature cache (same keys,
    same bytes).
    """
    script = tmp_path / "record.py"
    script.write_text(RECORDER)
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [
        str(accelerate), "launch", "--config_file", str(ROOT / "examples" / "accelerate" / "sharded_base.yaml"),
        "--num_processes", "2", str(script), str(tmp_path),
        *arguments(tiny_llama_dir, math_jsonl, tmp_path, shard_base="true", use_cpu="true"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert ranks[0]["sharded"].item() == 1
    assert ranks[0]["rows"].tolist() == [16, 32]  # each process holds half of a base weight's rows
    heads = [name for name in ranks[0] if name.startswith("head.")]
    for name in heads:
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # replicated, kept equal
    assert ranks[0]["head.default.gate"].abs().item() > 0  # trained: the gate starts at zero
    assert "Caching base features (sharded base)" in result.stderr
    built = [p for p in (tmp_path / "cache" / "features").iterdir() if p.is_dir()]  # not the build locks
    assert len(built) == 2  # training and held-out rows, built once

    state = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["epoch"] == pytest.approx(1.0)  # 32 rows / (2 x 4) a step
    assert not list((tmp_path / "out").rglob("optimizer.pt"))  # the head alone: such a run does not resume
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["comparison"]["base + trained head"]["answers_scored"] == 2  # generation ran sharded too

    model = LlamaBackwardAttentionForCausalLM.from_pretrained(tiny_llama_dir).eval()
    model.load_head(tmp_path / "out" / "head")
    with torch.no_grad():
        logits = model(input_ids=ranks[0]["ids"]).logits
    torch.testing.assert_close(logits, ranks[0]["logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])


@pytest.mark.parametrize(
    "overrides, environment, message",
    [
        ({"shard_base": "true"}, {}, "this run has 1: launch it with `torchrun --nproc_per_node N"),
        ({"shard_base": "true", "resume_from_checkpoint": "True"}, {}, "not supported with --shard_base"),
        ({"fsdp": "full_shard"}, {}, "would shard the head too"),
        ({}, {"ACCELERATE_USE_FSDP": "true"}, "would shard the head too"),
    ],
)
def test_sharding_settings_that_cannot_work_are_refused_before_loading(
    tiny_llama_dir, math_jsonl, tmp_path, monkeypatch, overrides, environment, message
):
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(train_sft, "resolve_base_model", lambda *a: pytest.fail("the base was loaded first"))
    with pytest.raises(BackattnValueError, match=message):
        train_sft.main(arguments(tiny_llama_dir, math_jsonl, tmp_path, **overrides))
