"""A tiny causal LM with a real tokenizer, built deterministically in about a second.

Why: the generation tests (engine side and API side) need a real HF causal-LM folder — a
byte-level BPE tokenizer, a chat template, safetensors weights — without a model hub and
without the 98 MB SmolLM2. Same seed, same corpus, same folder, byte for byte in its weights.

Use: ``build_tiny_lm(path)`` writes the folder and returns it (``max_position_embeddings``
4096, so a 2,000-token prompt fits). The weights are random but large enough
(``initializer_range`` 0.5) that greedy decoding has clear argmax margins, so batched and
single-sequence fp32 runs pick the same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

#: A chat template in the ChatML style SmolLM2 uses.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# The training text ships with the code so that the tokenizer never depends on docs that change.
CORPUS = """\
Lastmile is an edge inference appliance. It hosts models, each in its own runner process,
and serves them over a Unix socket with dynamic batching and a memory budget it never crosses.
The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.
What is the capital of Germany? The capital of Germany is Berlin.
A language model predicts the next token from the tokens before it. Sampling picks one token
with a temperature, a top-p nucleus and a top-k cut; greedy decoding always takes the most
likely token. The key-value cache holds the attention keys and values of every token so far,
two tensors per layer, so a long context costs memory in proportion to its length.
Continuous batching lets sequences join and leave between decode steps: a new request does not
wait for the whole batch to finish, and a client that goes away frees its slot at once.
Hello, world! How are you today? I am fine, thank you. 0123456789 + - * / = ( ) [ ] { } < > .
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
"""


def build_tiny_lm(path: str | Path, *, vocab_size: int = 512, seed: int = 0,
                  max_position_embeddings: int = 4096, hidden_size: int = 64, layers: int = 2,
                  heads: int = 4, kv_heads: int = 2) -> Path:
    """Write a tiny Llama causal-LM folder (config, safetensors, tokenizer, chat template).
    The shape arguments make a variant with a bigger KV cache per token (memory tests)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    # transformers 5 writes chat_template.jinja; readers that only look at
    # tokenizer_config.json (ORT-GenAI, older tools) find it there too.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")

    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_position_embeddings,
        initializer_range=0.5, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id, tie_word_embeddings=False, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    return out


if __name__ == "__main__":  # python -m lastmile.runtime.generation.tiny DIR
    import sys

    print(build_tiny_lm(sys.argv[1] if len(sys.argv) > 1 else "tiny-lm"))
