"""A sentencepiece tokenizer trained on our own training split, deterministically and in-process."""
import io
from pathlib import Path

import sentencepiece as spm

from data.synth import DATA_DIR, DataError
from data.user import records
from rundir import atomic_write

TINY_VOCAB = 1536  # = the tiny preset in model.py; keeps both data sets inside their token ranges
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # T5's ids; like T5 there is no BOS


def training_texts(root: Path = DATA_DIR) -> list[str]:
    """Prompts and responses of the training split behind --data: nothing from validation/test."""
    return [rec[field] for rec in records("train", root) for field in ("prompt", "response") if field in rec]


def train_tokenizer(texts: list[str], vocab_size: int, path: Path) -> "Tokenizer":
    """Train a BPE model on `texts` and write it to `path` atomically; same input, same bytes."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        # BPE, not unigram: on this small corpus unigram spends a tiny vocabulary on whole country
        # names and spells capitals letter by letter; BPE merges follow the names' syllables
        model_type="bpe",
        # determinism: one thread, every sentence used in the given order (no sampling)
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
        # exact round trip of our ASCII text; unseen characters become bytes, never <unk>
        normalization_rule_name="identity", byte_fallback=True, split_digits=True,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        # a small corpus cannot fill a large vocabulary; take what it supports instead of failing
        hard_vocab_limit=False, minloglevel=2)
    path = Path(path)
    atomic_write(path, model.getvalue())  # a crash never leaves a half-written model behind
    return Tokenizer(path)


class Tokenizer:
    """Thin wrapper around a sentencepiece model — ours, or a T5 checkpoint's spiece.model: T5's ids
    pad/eos/unk = 0/1/2 (no BOS) and a `pieces` table for the reward's word boundaries and for plots."""

    def __init__(self, path: Path):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: tokenizer model is missing; run `python cagsr.py prepare`")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load_from_serialized_proto(path.read_bytes())
        except (RuntimeError, OSError) as e:
            raise DataError(f"{path}: tokenizer model is corrupt ({str(e).splitlines()[0]}); "
                            "delete it and run `python cagsr.py prepare`") from None
        self.path = path
        self.pad_id, self.eos_id, self.unk_id = self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id()
        if (self.pad_id, self.eos_id) != (PAD_ID, EOS_ID):
            raise DataError(f"{path}: pad/eos ids are {self.pad_id}/{self.eos_id}, not T5's {PAD_ID}/{EOS_ID}")
        self.vocab_size = self.sp.get_piece_size()
        self.pieces = [self.sp.id_to_piece(i) for i in range(self.vocab_size)]

    def encode(self, text: str) -> list[int]:
        """The pieces of `text` and EOS, as T5 reads a prompt and writes a response."""
        return self.sp.encode(text) + [self.eos_id]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids) -> str:
        """Text of `ids` up to the first EOS; pad and ids beyond the tokenizer's vocabulary (the model's
        vocabulary may be larger) are skipped."""
        out = []
        for i in map(int, ids):
            if i == self.eos_id:
                break
            if i != self.pad_id and 0 <= i < self.vocab_size:
                out.append(i)
        return self.sp.decode(out)


def tokenizer_for(run: Path) -> Tokenizer:
    """The tokenizer that `python cagsr.py prepare` trained into the run directory `run`."""
    return Tokenizer(Path(run) / "tokenizer.model")
