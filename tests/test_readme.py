"""The README's usage snippet runs as written (offline, on the real SmolLM2)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()] == ["make demo", "make test"]


@pytest.mark.integration
def test_readme_usage_snippets_run(smollm2_dir, tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2, "README lost its python snippets"
    monkeypatch.chdir(tmp_path)  # the snippets save into the working directory
    namespace = {"__name__": "__readme__"}
    for block in blocks:  # each snippet continues the one before it
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "heads.default" in printed and "7 times 6" in printed
    assert "['math', 'sentiment'] torch.Size([3," in printed
    assert (tmp_path / "my-model" / "config.json").exists()
    assert (tmp_path / "heads" / "math" / "head.safetensors").exists()
    assert printed.count("trainable params: ") == 2  # the TRL and the LoRA-and-head snippets
    assert (tmp_path / "lora-and-head" / "adapter_model.safetensors").exists()
    assert (tmp_path / "lora-and-head" / "heads" / "default" / "head.safetensors").exists()
