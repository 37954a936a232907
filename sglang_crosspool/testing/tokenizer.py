"""A small, deterministic byte-level BPE tokenizer for synthetic test checkpoints.

In: a vocabulary size (default 1024) and an output folder.
Out: ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` in that folder,
loadable by ``transformers.AutoTokenizer`` and ``tokenizers.Tokenizer.from_file``, with a ChatML
chat template and three special tokens (ids 0, 1, 2 in this order):
``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``.

The training text is built into this module (fixed sentences, recombined by a seeded RNG) rather
than read from Python's stdlib, because stdlib sources differ between Python versions and the
vocabulary must be identical on every machine. A trained ``tokenizer.json`` is cached under
``$SGLANG_CROSSPOOL_CACHE`` (default ``~/.cache/sglang_crosspool``) in a folder keyed by
vocabulary size and ``TOKENIZER_VERSION``; bump the version whenever the corpus or the trainer
settings change, so stale caches are not reused.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

TOKENIZER_VERSION = "1"
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
MODEL_MAX_LENGTH = 32768

# ChatML, as used by the Qwen chat models: one block per message, then an open assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Counts how many times this process trained a tokenizer; tests use it to prove cache reuse.
train_count = 0

_SENTENCES = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the hill.",
    "A mixture of experts sends every token to a few small networks instead of one big one.",
    "Each expert is a gated feed forward block; the router picks the top scoring experts.",
    "Serving many models on one machine means sharing memory between weights and caches.",
    "When a model is cold, its weights wait in host memory until the first request arrives.",
    "The scheduler decides which requests run together in the next batch on the device.",
    "Attention reads the keys and values of every earlier token from the paged cache.",
    "Rotary position embeddings turn each pair of channels by an angle that grows with position.",
    "She opened the window, looked at the rain, and decided to stay inside with a good book.",
    "Numbers like 0, 1, 2, 3, 42, 128, 1024 and 65536 appear often in programs and logs.",
    "Please write a short poem about the sea, the wind, and the light of the evening sun.",
    "What is the capital of France? The capital of France is Paris, a city on the Seine.",
    "How many legs does a spider have? A spider has eight legs and usually eight eyes.",
    "The engineer measured the latency of the first token and the throughput of decoding.",
    "Tests compare the logits of the engine with the reference implementation, token by token.",
    "If the gap between the two best logits is tiny, greedy decoding may pick either one.",
    "Hello, world! How are you today? I am fine, thank you, and I hope you are well too.",
    "Good morning; the train leaves at half past seven, so we should walk to the station now.",
    "In the beginning there was only text, and then someone decided to split it into tokens.",
    "Small models train quickly, but large models need many machines and a lot of patience.",
    "The library keeps a list of books, and each book has a title, an author and a year.",
    "Water boils at one hundred degrees at sea level and freezes at zero degrees Celsius.",
    "An apple a day keeps the doctor away, or so the old saying goes in many families.",
    "They walked along the river, talking about music, mathematics, and their old friends.",
    "The system prompt tells the assistant to answer briefly, politely and in plain English.",
    "You are a helpful assistant. Answer the question of the user as well as you can.",
    "Summarize the following paragraph in one sentence and list three important keywords.",
    "Translate the sentence into German, then explain the grammar of the translation.",
)

_CODE_LINES = (
    "def forward(self, hidden_states, position_ids=None):",
    "    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",
    "for layer_idx, layer in enumerate(self.layers):",
    "    hidden_states = layer(hidden_states, attention_mask=attention_mask)",
    "import json, os, sys",
    "from pathlib import Path",
    "class Config:",
    "    def __init__(self, vocab_size=1024, hidden_size=64, num_layers=2):",
    "        self.vocab_size = vocab_size",
    "if __name__ == '__main__':",
    "    main(sys.argv[1:])",
    "with open(path, 'r', encoding='utf-8') as f:",
    "    data = json.load(f)",
    "x = torch.zeros((batch_size, seq_len), dtype=torch.long)",
    "logits = model(input_ids).logits[:, -1, :]",
    "assert tokens == expected, f'{tokens} != {expected}'",
    "print('done', len(results), 'items in', round(elapsed, 3), 'seconds')",
    "raise ValueError(f'unknown architecture: {arch!r}')",
)

# Recombined sentences give the trainer enough repeated pairs to reach a 1024-entry vocabulary.
_SYNTHETIC_LINES = 4000


def _corpus() -> list[str]:
    """The training text: fixed lines plus seeded recombinations of their words."""
    lines = list(_SENTENCES) + list(_CODE_LINES)
    words = sorted({w for line in _SENTENCES for w in line.split()})
    rng = random.Random(20240607)  # random.Random's choice/randint are stable across versions
    for _ in range(_SYNTHETIC_LINES):
        n = rng.randint(4, 14)
        lines.append(" ".join(rng.choice(words) for _ in range(n)))
    for content in _SENTENCES[-6:]:
        lines.append(f"{IM_START}user\n{content}{IM_END}\n{IM_START}assistant\n")
    return lines


def _train(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on the built-in corpus."""
    global train_count
    train_count += 1
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: decode(encode(text)) must give back exactly the text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def cache_dir() -> Path:
    """Root of the on-disk cache shared by all synthetic artefacts."""
    root = os.environ.get("SGLANG_CROSSPOOL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "sglang_crosspool"


def _cached_tokenizer_path(vocab_size: int) -> Path:
    return cache_dir() / f"tokenizer-v{TOKENIZER_VERSION}-vocab{vocab_size}" / "tokenizer.json"


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename so a concurrent reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def get_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    """The trained tokenizer, from the cache when present, else trained and cached."""
    path = _cached_tokenizer_path(vocab_size)
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = _train(vocab_size)
    _atomic_write_text(path, tok.to_str(pretty=True))
    return tok


def special_token_ids(vocab_size: int = 1024) -> dict[str, int]:
    """Map of special token string to id (fixed by training order: 0, 1, 2)."""
    tok = get_tokenizer(vocab_size)
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def _tokenizer_config(tok: Tokenizer) -> dict:
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": ENDOFTEXT,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 1024) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = get_tokenizer(vocab_size)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    config = _tokenizer_config(tok)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {"bos_token": ENDOFTEXT, "eos_token": IM_END, "pad_token": ENDOFTEXT}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
