"""A sentencepiece tokenizer trained on our own training split, deterministically and in-process."""
import io
from pathlib import Path

import sentencepiece as spm

from data.synth import DATA_DIR, DATASETS, DataError, load_split
from rundir import atomic_write

TINY_VOCAB = 1536  # = the tiny preset in model.py; keeps both data sets inside their token ranges
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def training_texts(root: Path = DATA_DIR) -> list[str]:
    """Prompts and responses of the training split of both data sets: nothing from validation/test."""
    return [rec[field] for dataset in DATASETS for rec in load_split(dataset, "train", root)
            for field in ("prompt", "response")]


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
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        # a small corpus cannot fill a large vocabulary; take what it supports instead of failing
        hard_vocab_limit=False, minloglevel=2)
    path = Path(path)
    atomic_write(path, model.getvalue())  # a crash never leaves a half-written model behind
    return Tokenizer(path)


class Tokenizer:
    """Thin wrapper: ids with fixed pad/bos/eos/unk = 0/1/2/3 and a `pieces` table for plots."""

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
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (
            self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id())
        self.vocab_size = self.sp.get_piece_size()
        self.pieces = [self.sp.id_to_piece(i) for i in range(self.vocab_size)]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids) -> str:
        """Text of `ids` up to the first EOS; pad, BOS and ids beyond our vocabulary (the model's
        vocabulary may be larger) are skipped."""
        out = []
        for i in map(int, ids):
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id) and 0 <= i < self.vocab_size:
                out.append(i)
        return self.sp.decode(out)


def tokenizer_for(run: Path) -> Tokenizer:
    """The tokenizer that `python cagsr.py prepare` trained into the run directory `run`."""
    return Tokenizer(Path(run) / "tokenizer.model")
