"""Hugging Face T5-family checkpoints in and out: model.py's Transformer *is* T5, so loading one is a
renaming of its weights, and exporting is the renaming back.

    read_checkpoint(folder)   config.json + model.safetensors / pytorch_model.bin (sharded or not),
                              checked and translated into model.py's config fields and weight names
    hf_name, hf_config        the way back: rundir.export_hf writes a folder transformers reads
    PUBLISHED                 the architectures of the published T5, T5 v1.1, Flan-T5 and mT5 checkpoints

Nothing is downloaded: a checkpoint is a local folder, fetched once by the user (README). Weights are
read with safetensors or with torch.load(weights_only=True), so no pickled code ever runs.
"""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

# our module name -> T5's, inside encoder.block.{i}.layer. / decoder.block.{i}.layer.
ENCODER_LAYER = {"ln1": "0.layer_norm", "attn": "0.SelfAttention", "ln2": "1.layer_norm", "ff": "1.DenseReluDense"}
DECODER_LAYER = {"ln1": "0.layer_norm", "self_attn": "0.SelfAttention", "ln2": "1.layer_norm",
                 "cross_attn": "1.EncDecAttention", "ln3": "2.layer_norm", "ff": "2.DenseReluDense"}
TOP = {"embed.weight": "shared.weight", "lm_head.weight": "lm_head.weight",
       "enc_pos.bias.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
       "dec_pos.bias.weight": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
       "enc_norm.weight": "encoder.final_layer_norm.weight", "dec_norm.weight": "decoder.final_layer_norm.weight"}
# in HF checkpoints but not ours: copies of `shared`, and a cross-attention bias T5 never uses
REDUNDANT = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
             "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}
PRETRAINED_MAX_LEN = 512  # T5 was pretrained on 512-token inputs


class CheckpointError(ValueError):
    """A folder that is not a usable T5-family checkpoint (the CLI prints it as one line, exit 2)."""


def hf_name(ours: str) -> str:
    """model.py's weight name -> T5's, e.g. decoder.2.cross_attn.q.weight -> decoder.block.2.layer.1.EncDecAttention.q.weight."""
    if ours in TOP:
        return TOP[ours]
    stack, i, module, rest = ours.split(".", 3)
    table = ENCODER_LAYER if stack == "encoder" else DECODER_LAYER
    return f"{stack}.block.{i}.layer.{table[module]}.{rest}"


def our_name(theirs: str) -> str | None:
    """T5's weight name -> model.py's (None for a name that has no place in model.py)."""
    top = {v: k for k, v in TOP.items()}
    if theirs in top:
        return top[theirs]
    parts = theirs.split(".")  # stack, "block", i, "layer", j, module, rest…
    if len(parts) < 7 or parts[0] not in ("encoder", "decoder") or parts[1:4:2] != ["block", "layer"]:
        return None
    table = ENCODER_LAYER if parts[0] == "encoder" else DECODER_LAYER
    module = {v: k for k, v in table.items()}.get(f"{parts[4]}.{parts[5]}")
    return None if module is None else ".".join([parts[0], parts[2], module, *parts[6:]])


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: one file, or the shards its index lists."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{folder / index}: not a weight index ({e})") from None
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin (nor a sharded index) in it")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint by T5's names, read without executing pickled code."""
    weights = {}
    for path in weight_files(folder):
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the index but missing")
        try:
            if path.suffix == ".safetensors":
                weights.update(load_file(path))
            else:
                weights.update(torch.load(path, map_location="cpu", weights_only=True))
        except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt weight file ({str(e).splitlines()[0]})") from None
    return weights


def model_config(conf: dict, names: set[str]) -> dict:
    """ModelConfig fields of a T5-family config.json, with the variant decided by the weights present.

    Gated vs ReLU: a `wi_0` matrix. Untied vs tied: an `lm_head.weight`. The d_model^-0.5 output rescale:
    `scale_decoder_outputs` when the config has it (transformers 5 writes it), else `tie_word_embeddings`
    (published configs: true for T5 v1.0, false for v1.1, Flan-T5 and mT5; absent means true).
    """
    return dict(
        vocab_size=conf["vocab_size"], d_model=conf["d_model"], n_heads=conf["num_heads"], d_kv=conf["d_kv"],
        d_ff=conf["d_ff"], n_enc_layers=conf["num_layers"],
        n_dec_layers=conf.get("num_decoder_layers") or conf["num_layers"],
        gated="encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in names,
        tied="lm_head.weight" not in names,
        scale_output=bool(conf.get("scale_decoder_outputs", conf.get("tie_word_embeddings", True))),
        num_buckets=conf.get("relative_attention_num_buckets", 32),
        max_distance=conf.get("relative_attention_max_distance", 128),
        eps=conf.get("layer_norm_epsilon", 1e-6), max_len=PRETRAINED_MAX_LEN,
        pad_id=conf.get("pad_token_id", 0), eos_id=conf.get("eos_token_id", 1))


def tokenizer_file(folder) -> Path:
    """The checkpoint's sentencepiece model (T5's spiece.model), which data/tokenizer.py reads."""
    path = Path(folder) / "spiece.model"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a T5 checkpoint folder holds its sentencepiece model beside the weights")
    return path


def read_config_json(folder: Path) -> dict:
    """config.json of a T5-family checkpoint folder, checked."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (pass the folder holding config.json and the weights)")
    path = folder / "config.json"
    try:
        conf = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; not a Hugging Face checkpoint folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(conf, dict) or conf.get("model_type") not in ("t5", "mt5"):
        kind = conf.get("model_type") if isinstance(conf, dict) else None
        raise CheckpointError(f"{path}: model_type {kind!r} is not a T5-family model (t5 or mt5)")
    return conf


def fields(folder: Path, conf: dict, names: set[str]) -> dict:
    try:
        return model_config(conf, names)
    except KeyError as e:
        raise CheckpointError(f"{folder / 'config.json'}: has no {e.args[0]!r}") from None


def read_config(folder) -> dict:
    """ModelConfig fields of a checkpoint folder, without loading its weights (safetensors)."""
    folder = Path(folder)
    conf, names = read_config_json(folder), set()
    for path in weight_files(folder):
        if path.suffix != ".safetensors":
            return fields(folder, conf, set(read_weights(folder)))
        try:
            with safe_open(path, "pt") as f:
                names |= set(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: corrupt weight file ({str(e).splitlines()[0]})") from None
    return fields(folder, conf, names)


def read_checkpoint(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(ModelConfig fields, weights by model.py's names in fp32) of a local T5-family checkpoint folder."""
    folder = Path(folder)
    conf = read_config_json(folder)
    weights = read_weights(folder)
    config = fields(folder, conf, set(weights))
    ours = {}
    for name, tensor in weights.items():
        if name in REDUNDANT:
            continue
        mine = our_name(name)
        if mine is None:
            raise CheckpointError(f"{folder}: weight {name!r} is not part of a T5 model")
        ours[mine] = tensor.float()
    return config, ours


def check_weights(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], folder) -> None:
    """Every weight the model needs is there with its shape, and no other; one line naming the first
    that is not."""
    for name in weights:
        if name not in expected:
            raise CheckpointError(f"{folder}: weight {hf_name(name)!r} does not fit the model config.json describes")
    for name, want in expected.items():
        if name not in weights:
            raise CheckpointError(f"{folder}: weight {hf_name(name)!r} is missing")
        if weights[name].shape != want.shape:
            raise CheckpointError(f"{folder}: weight {hf_name(name)!r} has shape {tuple(weights[name].shape)}, "
                                  f"config.json implies {tuple(want.shape)}")


def hf_config(cfg) -> dict:
    """config.json for T5ForConditionalGeneration describing model.py's ModelConfig `cfg`."""
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
            "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "num_heads": cfg.n_heads, "d_kv": cfg.d_kv,
            "d_ff": cfg.d_ff, "num_layers": cfg.n_enc_layers, "num_decoder_layers": cfg.n_dec_layers,
            "feed_forward_proj": "gated-gelu" if cfg.gated else "relu",
            "tie_word_embeddings": cfg.tied, "scale_decoder_outputs": cfg.scale_output,
            "relative_attention_num_buckets": cfg.num_buckets, "relative_attention_max_distance": cfg.max_distance,
            "layer_norm_epsilon": cfg.eps, "dropout_rate": 0.0, "is_encoder_decoder": True,
            "pad_token_id": cfg.pad_id, "eos_token_id": cfg.eos_id, "decoder_start_token_id": cfg.pad_id}


# The published checkpoints this model loads (fields of their config.json; v1.0 is ReLU and tied, the
# rest gated GELU with an untied lm_head). `python cagsr.py plan --published` counts their parameters.
_V1_1 = dict(vocab_size=32128, gated=True, tied=False)
_MT5 = dict(vocab_size=250112, gated=True, tied=False)
PUBLISHED = {
    "t5-small": dict(vocab_size=32128, d_model=512, n_heads=8, d_ff=2048, n_enc_layers=6, n_dec_layers=6,
                     gated=False, tied=True, scale_output=True),
    "t5-base": dict(vocab_size=32128, d_model=768, n_heads=12, d_ff=3072, n_enc_layers=12, n_dec_layers=12,
                    gated=False, tied=True, scale_output=True),
    "t5-large": dict(vocab_size=32128, d_model=1024, n_heads=16, d_ff=4096, n_enc_layers=24, n_dec_layers=24,
                     gated=False, tied=True, scale_output=True),
    **{f"{family}-{size}": dict(_V1_1, **arch) for family in ("google/t5-v1_1", "google/flan-t5")
       for size, arch in {"small": dict(d_model=512, n_heads=6, d_ff=1024, n_enc_layers=8, n_dec_layers=8),
                          "base": dict(d_model=768, n_heads=12, d_ff=2048, n_enc_layers=12, n_dec_layers=12),
                          "large": dict(d_model=1024, n_heads=16, d_ff=2816, n_enc_layers=24, n_dec_layers=24),
                          "xl": dict(d_model=2048, n_heads=32, d_ff=5120, n_enc_layers=24, n_dec_layers=24),
                          }.items()},
    "google/mt5-small": dict(_MT5, d_model=512, n_heads=6, d_ff=1024, n_enc_layers=8, n_dec_layers=8),
    "google/mt5-base": dict(_MT5, d_model=768, n_heads=12, d_ff=2048, n_enc_layers=12, n_dec_layers=12),
    "google/mt5-large": dict(_MT5, d_model=1024, n_heads=16, d_ff=2816, n_enc_layers=24, n_dec_layers=24),
}
