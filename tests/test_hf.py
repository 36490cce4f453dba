"""hf.py and model.py against Hugging Face's own T5: a checkpoint written by transformers loads into
our model and gives the same logits, cross-attention and greedy answers; ours exports back into one
transformers loads. The checkpoints are random, built from configs — nothing is downloaded."""
import copy
import json

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from hf import PUBLISHED, CheckpointError, hf_name, our_name
from model import ModelConfig, Transformer, decoder_input
from rundir import export_hf

VOCAB = 300
# the published depths (t5-small 6/6, t5-v1_1-small and flan-t5-small 8/8), narrow widths
VARIANTS = {
    "v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True, num_layers=6),
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_layers=8),
}


def hf_model(variant: str, seed=0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, num_heads=4, d_ff=128, dropout_rate=0.0,
                      **VARIANTS[variant])
    model = T5ForConditionalGeneration(config)
    if not config.scale_decoder_outputs:  # transformers 5 ties lm_head at construction: give it its own
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 64))
    return model.eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(HF model, our model loaded from its save_pretrained folder, the folder)."""
    folder = tmp_path_factory.mktemp(request.param)
    hf_model(request.param).save_pretrained(folder)
    theirs = T5ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    return theirs, Transformer.from_pretrained(folder).eval(), folder


def batch(seed=1):
    """A padded batch: prompts of 11, 7 and 4 real tokens ending in EOS, and targets."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (3, 11), generator=g)
    for row, n in enumerate((11, 7, 4)):
        src[row, n - 1], src[row, n:] = 1, 0
    return src, torch.randint(3, VOCAB, (3, 9), generator=g)


def hf_forward(model, src, dec_in):
    with torch.no_grad():
        return model(input_ids=src, attention_mask=(src != 0).long(), decoder_input_ids=dec_in, output_attentions=True)


def test_variant_is_read_from_the_weights(pair):
    theirs, ours, _ = pair
    assert ours.cfg.gated == theirs.config.is_gated_act
    assert ours.cfg.tied == ours.cfg.scale_output == theirs.config.scale_decoder_outputs
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters())


def test_logits_and_cross_attention_equal_hugging_face(pair):
    theirs, ours, _ = pair
    src, tgt = batch()
    dec_in = decoder_input(tgt, 0)
    out = hf_forward(theirs, src, dec_in)
    with torch.no_grad():
        logits, attn = ours(src, dec_in, capture_last=1)
    ref = out.logits[..., 1:]  # our pad column is −1e9: pad is never emitted
    assert (logits[..., 1:] - ref).abs().max() <= 1e-5 * ref.abs().max()
    torch.testing.assert_close(attn, out.cross_attentions[-1].mean(dim=1), atol=1e-6, rtol=0)


def test_greedy_generation_equals_hugging_face(pair):
    theirs, ours, _ = pair
    src, _ = batch(seed=2)
    out = theirs.generate(input_ids=src, attention_mask=(src != 0).long(), do_sample=False, max_new_tokens=12,
                          suppress_tokens=[0], decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    r = ours.generate(src, greedy=True, max_new_tokens=12)
    T = r.tokens.shape[1]
    assert torch.equal(out[:, 1 : T + 1], r.tokens)


def test_export_loads_in_transformers_with_our_logits(pair, tmp_path):
    ours = copy.deepcopy(pair[1])
    torch.manual_seed(5)
    with torch.no_grad():  # a "tuned" policy: move every weight
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export_hf(ours, tmp_path)
    back = T5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    src, tgt = batch(seed=3)
    dec_in = decoder_input(tgt, 0)
    with torch.no_grad():
        logits, _ = ours(src, dec_in)
    ref = hf_forward(back, src, dec_in).logits[..., 1:]
    assert (logits[..., 1:] - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert Transformer.from_pretrained(tmp_path).cfg == ours.cfg


def test_sharded_and_pickle_free_bin_checkpoints_load_the_same(pair, tmp_path):
    theirs, ours, _ = pair
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(theirs.config.to_dict()))
    state = theirs.state_dict()  # as older published checkpoints hold: the tied copies, and a cross-attention bias
    state["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(32, 4)
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    for folder in ("sharded", "bin"):
        loaded = Transformer.from_pretrained(tmp_path / folder)
        for (name, a), b in zip(ours.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), (folder, name)


def test_weight_names_round_trip():
    torch.manual_seed(0)
    for cfg in (ModelConfig(gated=False, tied=True), ModelConfig()):
        for name in Transformer(cfg).state_dict():
            assert our_name(hf_name(name)) == name


@pytest.mark.parametrize("damage, message", [
    ("no folder", "not a folder"),
    ("no config", "config.json: missing"),
    ("not json", "not valid JSON"),
    ("bert", "model_type 'bert' is not a T5-family model"),
    ("no weights", "no model.safetensors or pytorch_model.bin"),
    ("corrupt weights", "model.safetensors: corrupt weight file"),
    ("wrong shape", "has shape"),
    ("missing weight", "is missing"),
])
def test_a_folder_that_is_not_a_t5_checkpoint_is_one_clear_error(pair, tmp_path, damage, message):
    _, _, good = pair
    folder = tmp_path / "ckpt"
    if damage != "no folder":
        folder.mkdir()
        for f in good.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
    config = folder / "config.json"
    if damage == "no config":
        config.unlink()
    elif damage == "not json":
        config.write_text("{")
    elif damage in ("bert", "wrong shape"):
        conf = json.loads(config.read_text())
        conf.update({"model_type": "bert"} if damage == "bert" else {"d_ff": 96})
        config.write_text(json.dumps(conf))
    elif damage == "no weights":
        (folder / "model.safetensors").unlink()
    elif damage == "corrupt weights":
        (folder / "model.safetensors").write_bytes(b"\x00" * 40)
    elif damage == "missing weight":
        from safetensors.torch import load_file, save_file
        weights = load_file(folder / "model.safetensors")
        weights.pop("decoder.final_layer_norm.weight")
        save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=message) as err:
        Transformer.from_pretrained(folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


def test_published_checkpoints_have_their_known_sizes():
    """Parameter counts from the published configs, on the meta device (the README's table)."""
    counts = {}
    for name, arch in PUBLISHED.items():
        with torch.device("meta"):
            counts[name] = Transformer(ModelConfig(**arch)).num_parameters()
    assert abs(counts["t5-small"] - 60.5e6) < 0.5e6 and abs(counts["t5-large"] - 737.7e6) < 1e6
    assert abs(counts["google/flan-t5-large"] - 783.2e6) < 1e6
    assert abs(counts["google/mt5-large"] - 1.23e9) < 0.01e9
