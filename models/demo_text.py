"""A small Hugging Face encoder folder built here, deterministically, with a real tokenizer.

No hub download: a WordPiece tokenizer (the ``tokenizers`` library) learns its vocabulary
from the text shipped in :data:`CORPUS`, a tiny BERT is built from a fixed seed, and both are written with
``save_pretrained`` exactly as a downloaded folder would hold them (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``...). With
``sentence_transformers=True`` the folder also gets the files sentence-transformers writes
(``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``, a Normalize
module), so it is served as pooled, normalized sentence embeddings.

Used by ``lastmile demo`` (``demo-encoder``) and by the tests, which rebuild the same folder
and compare the daemon's answers with transformers computed in the test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["CORPUS", "build_tokenizer", "build_encoder_folder", "ENCODER_SEED"]

ENCODER_SEED = 2024
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# The text the demo tokenizer learns its vocabulary from (shipped, so the build is offline and
# the same everywhere). Plain sentences about the appliance's own world.
CORPUS = """\
Lastmile is an edge inference appliance for one machine and maybe one accelerator.
The operator drops a model folder into the store, sets a memory limit and sees it run.
A runner process hosts each model, so a crash in one model never takes the daemon down.
The dynamic batcher groups requests of the same shape and sends whole batches to the runner.
Embeddings turn a sentence into a vector; similar sentences get vectors that point the same way.
A classifier reads a sentence and answers with a label and a score for every label.
The factory line box reads sensor reports and flags the ones that look unusual.
The substation computer summarises alarms and sorts them by how urgent they are.
The hospital imaging node keeps patient data on site and answers within milliseconds.
Memory limits must hold, estimates must be visible, and unload must free what it took.
Tokens are pieces of words; a tokenizer splits text into tokens and maps them to ids.
Attention lets every token look at every other token in the same sentence.
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
Good service is fast, predictable and easy to operate when nobody is watching.
The weather today is cold and windy, with rain in the evening and snow at night.
Please restart the pump when the pressure drops below the threshold for ten minutes.
The temperature sensor reported an error; the backup sensor shows normal values.
Shipping is delayed because the truck broke down on the highway near the border.
I love this product, it works great and the support team was very helpful.
This is terrible, the device stopped working after two days and nobody answered.
"""


SUFFIXES = ("s", "es", "ed", "ing", "ly", "er", "est", "tion", "ment")


def build_tokenizer(max_words: int = 300) -> Any:
    """A BERT-style WordPiece tokenizer (lower-casing, ``[CLS] x [SEP]``) whose vocabulary is
    learned from :data:`CORPUS`: its normalizer and pre-tokenizer split the text, the
    ``max_words`` most frequent words become whole tokens, every character becomes a token
    and a ``##`` continuation, plus common suffixes, so unseen words split into pieces.

    Why not ``WordPieceTrainer``: its tie-breaking between equally frequent merges differs
    from run to run (a different vocabulary each build), and the demo must be byte-identical.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for line in CORPUS.splitlines():
        words.update(piece for piece, _ in pre.pre_tokenize_str(normalizer.normalize_str(line)))
    chars = sorted({c for w in words for c in w})
    common = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:max_words]]
    pieces = list(dict.fromkeys([*SPECIAL, *chars, *(f"##{c}" for c in chars), *(f"##{s}" for s in SUFFIXES),
                                 *sorted(common)]))
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    return tok


def build_encoder_folder(folder: Path | str, *, task: str = "feature-extraction", sentence_transformers: bool = True,
                         hidden: int = 32, layers: int = 2, heads: int = 2, max_length: int = 64,
                         intermediate: int | None = None,
                         labels: tuple[str, ...] = ("negative", "positive"), seed: int = ENCODER_SEED) -> Path:
    """Write a tiny BERT folder (``task``: feature-extraction or text-classification) to
    ``folder``, the same bytes for the same arguments. Returns ``folder``."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    config = transformers.BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate or hidden * 2, max_position_embeddings=max_length + 64, pad_token_id=tok.token_to_id("[PAD]"),
    )
    if task in ("text-classification", "token-classification"):
        config.id2label = dict(enumerate(labels))
        config.label2id = {v: k for k, v in config.id2label.items()}
        cls = (transformers.BertForSequenceClassification if task == "text-classification"
               else transformers.BertForTokenClassification)
    elif task == "feature-extraction":
        cls = transformers.BertModel
    else:
        raise ValueError(f"task {task!r}; allowed: feature-extraction, text-classification, token-classification")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=max_length, padding_side="right",
    )
    fast.save_pretrained(str(folder))
    if sentence_transformers and task == "feature-extraction":
        _write_sentence_transformers(folder, hidden, max_length)
    return folder


def _write_sentence_transformers(folder: Path, hidden: int, max_length: int) -> None:
    """The files sentence-transformers' ``save`` writes for Transformer -> Pooling(mean) -> Normalize."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    pooling = {
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True,
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length, "do_lower_case": False}))
