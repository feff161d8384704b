"""Size of a saved prompt state (`MinRNNCache.save`) against a GPT-2 KV cache of the same width and depth.

    python benchmarks/state_size.py

For each model shape, a prompt of each length is prefilled in chunks and its state saved; the table gives the
file's measured bytes. The GPT-2 column is computed, not measured: a KV cache holds a key and a value vector of
`n_embd` per layer and token, `2 * n_layer * tokens * n_embd` numbers, counted here in fp32 like minrnn's state `h`
(half that in fp16), from a `GPT2Config` of the same width and depth. (GPT-2 itself stops at 1,024 positions; the
longer rows say what a KV cache of that shape would need.) Weights are random: the size depends only on the shapes.
Writes `state_size.md` and `.json` under `--out`.
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config

from modeling_minrnn import MinRNNCache, MinRNNConfig, MinRNNForCausalLM

ROOT = Path(__file__).resolve().parents[1]

# (name, MinRNNConfig overrides, prompt lengths): the speculative-decoding target, and GPT-2 small's width and
# depth with the default expansion (MLP off: it holds no state, and this way 100k tokens prefill in a minute on CPU).
SHAPES = [
    ("benchmark target (192 x 4)", {"hidden_size": 192, "num_hidden_layers": 4, "intermediate_size": 768},
     (1_000, 100_000)),
    ("GPT-2 small shape (768 x 12)", {"hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 0},
     (1_000, 100_000)),
]


def kv_cache_bytes(config: GPT2Config, tokens: int, bytes_per_number: int = 4) -> int:
    return 2 * config.n_layer * tokens * config.n_embd * bytes_per_number


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name, overrides, lengths in SHAPES:
            torch.manual_seed(0)
            model = MinRNNForCausalLM(MinRNNConfig(vocab_size=1024, **overrides)).eval()
            gpt2 = GPT2Config(n_embd=model.config.hidden_size, n_layer=model.config.num_hidden_layers)
            for tokens in lengths:
                ids = torch.randint(0, 1024, (1, tokens), generator=torch.Generator().manual_seed(1))
                cache = model.prefill(ids, chunk_size=4096, cache=MinRNNCache(model.config)).cache
                path = os.path.join(tmp, "state.safetensors")
                cache.save(path, model)
                rows.append({
                    "model": name, "prompt_tokens": tokens, "state_file_bytes": os.path.getsize(path),
                    "gpt2_kv_fp32_bytes": kv_cache_bytes(gpt2, tokens),
                })
                print(rows[-1])
    lines = [
        "# Saved prompt state vs a GPT-2 KV cache of the same width and depth",
        "",
        ("State file: measured bytes of `MinRNNCache.save` (every layer's fp32 `h`, conv window, metadata), batch 1. "
         "GPT-2 KV cache: computed, `2 x n_layer x tokens x n_embd x 4` bytes (fp32; half in fp16)."),
        "",
        "| model | prompt tokens | state file | GPT-2 KV cache (fp32) | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['prompt_tokens']:,} | {r['state_file_bytes']:,} B | {r['gpt2_kv_fp32_bytes']:,} B | "
            f"{r['gpt2_kv_fp32_bytes'] / r['state_file_bytes']:,.0f}x |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "state_size.md").write_text("\n".join(lines) + "\n")
    (out / "state_size.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
