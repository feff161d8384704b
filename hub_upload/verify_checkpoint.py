"""Check a staged checkpoint the way a Hub user will load it; run in a fresh subprocess.

``python verify_checkpoint.py STAGED_DIR`` must run where the ``modeling_minrnn`` package cannot be
imported (``push_to_hub.verify_staged`` arranges it): the model then loads only through the code files
shipped in the folder (``trust_remote_code=True``), exactly as from the Hub. It checks that config,
weights and tokenizer (if it has one) agree and that the model generates, then prints one JSON line of measured facts
on stdout. On failure it prints ``VERIFY FAILED: <reason>`` on stderr and exits with status 1.
"""

import json
import os
import sys

# What makes a folder hold a tokenizer, as push_to_hub.py decides it (this script runs without the hub_upload package).
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")


class CheckFailed(Exception):
    pass


def _check(condition: bool, reason: str) -> None:
    if not condition:
        raise CheckFailed(reason)


def verify(folder: str) -> dict:
    """Load ``folder`` like a Hub user and return facts for the card: ``num_parameters``, ``vocab_size``, ..."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    _check(config.model_type == "minrnn", f"config.json model_type is {config.model_type!r}, expected 'minrnn'")
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        _check(not info.get(kind), f"the weights do not match the config: {kind} {sorted(info[kind])[:5]}")
    # Loaded through the shipped code, not an installed package: what a Hub user gets.
    _check(
        type(model).__module__.startswith("transformers_modules") and "modeling_minrnn" not in sys.modules,
        f"the model class came from {type(model).__module__}, not from the checkpoint's code files",
    )
    # A checkpoint may ship without a tokenizer (as transformers' push_to_hub allows): it then takes token ids.
    has_tokenizer = any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_MARKERS)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True) if has_tokenizer else None

    vocab = config.vocab_size
    _check(model.get_input_embeddings().weight.shape[0] == vocab,
           f"input embedding has {model.get_input_embeddings().weight.shape[0]} rows, config.vocab_size is {vocab}")
    _check(model.get_output_embeddings().weight.shape[0] == vocab,
           f"output head has {model.get_output_embeddings().weight.shape[0]} rows, config.vocab_size is {vocab}")
    if tokenizer is not None:
        _check(len(tokenizer) <= vocab, f"tokenizer has {len(tokenizer)} tokens, more than config.vocab_size={vocab}")
    generation_config = GenerationConfig.from_pretrained(folder) if model.can_generate() else None
    for name in ("pad", "bos", "eos"):
        key = f"{name}_token_id"
        tok_id = getattr(tokenizer, key, None)
        for source, obj in (("config.json", config), ("generation_config.json", generation_config)):
            ids = getattr(obj, key, None)
            ids = [] if ids is None else ids if isinstance(ids, list) else [ids]
            _check(all(0 <= i < vocab for i in ids), f"{source} {key}={ids} is outside the vocabulary [0, {vocab})")
            _check(tok_id is None or not ids or tok_id in ids,
                   f"{source} {key}={ids} disagrees with the tokenizer's {key}={tok_id}")

    model.eval()
    if tokenizer is None:  # token ids in: start from BOS, or from id 0
        prompt = torch.tensor([[config.bos_token_id if config.bos_token_id is not None else 0]])
    else:
        prompt = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    if prompt.shape[1] == 0:  # a tokenizer may map this English prompt to nothing; start from BOS then
        _check(tokenizer.bos_token_id is not None, "the tokenizer encodes the prompt to no tokens and has no BOS")
        prompt = torch.tensor([[tokenizer.bos_token_id]])
    _check(int(prompt.max()) < vocab, f"the tokenizer produced id {int(prompt.max())} >= vocab_size {vocab}")
    new_tokens = 4
    with torch.no_grad():
        logits = model(prompt).logits
        _check(bool(torch.isfinite(logits).all()), "the model produced non-finite logits")
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False)
    _check(output.shape == (1, prompt.shape[1] + new_tokens),
           f"generate returned shape {tuple(output.shape)}, expected (1, {prompt.shape[1] + new_tokens})")

    return {
        "num_parameters": model.num_parameters(),
        "vocab_size": vocab,
        "tokenizer_size": None if tokenizer is None else len(tokenizer),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def main(argv: list[str]) -> int:
    try:
        facts = verify(argv[0])
    except CheckFailed as err:
        print(f"VERIFY FAILED: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - any load error is a reason to refuse; report it, not a traceback
        print(f"VERIFY FAILED: loading the checkpoint raised {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
