"""Deterministic data sets of §7.1 (synthetic QA, instructions) and the sentencepiece tokenizer."""
import importlib

_EXPORTS = {
    "synth": ("DATA_DIR", "DATASETS", "SPLITS", "QA_QUESTION_TOKENS", "QA_ANSWER_TOKENS", "QA_PROMPT_TOKENS",
              "INSTRUCT_PROMPT_TOKENS", "INSTRUCT_RESPONSE_TOKENS", "DataError", "generate",
              "write_all", "load_split", "length_stats", "format_stats"),
    "tokenizer": ("TINY_VOCAB", "Tokenizer", "train_tokenizer", "training_texts"),
}
__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name):
    # Imported on first use rather than here, so `python -m data.synth` runs synth.py exactly once.
    for module, names in _EXPORTS.items():
        if name in names:
            return getattr(importlib.import_module(f"data.{module}"), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
