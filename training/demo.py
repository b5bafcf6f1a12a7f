"""A first run: LoRA on the embedded SmolLM2-135M-Instruct, end to end, in about a minute on a CPU.

    python -m training.demo

1. load the pretrained model;
2. inject LoRA into every q_proj and v_proj, freezing everything else;
3. check that B = 0 leaves the model's output exactly as it was;
4. take a few AdamW steps on one chat exchange, so the loss falls;
5. save the adapter (peft's format), load it into a fresh copy, and check the logits match.
"""

import argparse
import copy
import time
from pathlib import Path

import torch

from lora import inject_lora, load_adapter, print_trainable_parameters, save_adapter
from training.models import EMBEDDED, load_model

EXCHANGE = [
    {"role": "user", "content": "What does LoRA train?"},
    {"role": "assistant", "content": "Two small matrices per layer, A and B; the pretrained weights stay frozen."},
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=EMBEDDED, help="model name, Hugging Face id or folder (%(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="AdamW steps on the example (%(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo/adapter"), help="adapter folder (%(default)s)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")

    # 1. Load.
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    base = copy.deepcopy(model)
    print(f"1. loaded {args.model} in {time.perf_counter() - start:.1f} s")

    # 2. Inject LoRA: only A and B of each q_proj and v_proj will train.
    torch.manual_seed(0)
    names = inject_lora(model, ["q_proj", "v_proj"], r=8, alpha=16)
    print(f"2. LoRA (r=8, alpha=16) on {len(names)} modules, {names[0]} ... {names[-1]}")
    print_trainable_parameters(model)

    # 3. B starts at zero, so the adapted model starts exactly where the pretrained one is.
    text = tokenizer.apply_chat_template(EXCHANGE, tokenize=False)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        unchanged = torch.equal(model(ids).logits, base(ids).logits)
    print(f"3. with B = 0 the logits equal the pretrained model's: {unchanged}")

    # 4. Train on the one example; the loss is the usual next-token cross-entropy.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(1, args.steps + 1):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"4. step {step}/{args.steps}: loss {loss.item():.4f}")
    model.eval()

    # 5. Save only the adapter, load it into a fresh copy of the base, compare.
    save_adapter(model, args.out, base_model_name_or_path=args.model)
    size = (args.out / "adapter_model.safetensors").stat().st_size
    load_adapter(base, args.out)
    with torch.no_grad():
        same = torch.equal(base(ids).logits, model(ids).logits)
    print(f"5. saved the adapter to {args.out}/ ({size / 1e6:.1f} MB); reloaded, the logits match: {same}")


if __name__ == "__main__":
    main()
