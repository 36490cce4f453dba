"""The real-model path end to end, as a user with a Hugging Face checkpoint and their own prompts takes
it through the command line: sft --init, rl --init, eval, export — and what transformers reads back.
The checkpoint is a small random T5 v1.1 and a sentencepiece model trained here; nothing is downloaded."""
import json

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from conftest import assert_one_line_error, run_cli
from data import DataError
from data.tokenizer import train_tokenizer
from data.user import records
from model import Transformer, decoder_input

TOPICS = ["rivers", "bread", "owls", "copper", "tides", "maple trees", "comets", "violins"]


def user_records(n=40):
    """n prompt/response pairs, as a user's JSONL would hold them."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        out.append({"prompt": f"Write one sentence about {topic}, number {i}.",
                    "response": f"Here is a sentence about {topic}: {topic} are worth a look."})
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random Flan-T5-shaped checkpoint folder: config.json, model.safetensors, spiece.model."""
    folder = tmp_path_factory.mktemp("flan-t5-random")
    texts = [r[k] for r in user_records() for k in ("prompt", "response")] * 5
    tok = train_tokenizer(texts, 400, folder / "spiece.model")  # 256 byte pieces + ~100 words
    torch.manual_seed(0)
    config = T5Config(vocab_size=tok.vocab_size + 28, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                      num_decoder_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      dropout_rate=0.0, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(0.1 * torch.randn(config.vocab_size, 64))  # untied (see test_hf)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in user_records()))
    return path


def cli(*args):
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_sft_rl_eval_and_export_from_a_pretrained_checkpoint(checkpoint, data, tmp_path):
    run, common = tmp_path / "run", ["--init", str(checkpoint), "--data", str(data)]
    cli("sft", *common, "--out", str(run), "--steps", "6", "--batch-size", "8", "--eval-every", "3", "--warmup", "2")
    assert json.loads((run / "init.json").read_text())["init"] == str(checkpoint.resolve())
    assert (run / "tokenizer.model").read_bytes() == (checkpoint / "spiece.model").read_bytes()
    sft_rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(sft_rows) == 6 and all(r["loss"] == r["loss"] for r in sft_rows)
    cli("rl", *common, "--out", str(run), "--iterations", "2", "--batch-prompts", "4", "--samples", "2",
        "--max-new-tokens", "8", "--checkpoint-every", "1")
    rl_config = json.loads((run / "cagsr" / "config.json").read_text())
    assert rl_config["start"] == str(checkpoint)  # CAGSR straight from the checkpoint, not from sft.pt
    policy = run / "cagsr" / "rl.pt"
    proc = cli("eval", "--data", str(data), "--out", str(run), "--checkpoint", str(policy))
    assert "user_reward" in proc.stdout and "user_test_ppl" in proc.stdout
    cli("export", "--out", str(run), "--checkpoint", str(policy), "--hf", str(tmp_path / "exported"))

    exported = T5ForConditionalGeneration.from_pretrained(tmp_path / "exported").eval()
    ours = Transformer.from_pretrained(tmp_path / "exported").eval()
    src = torch.tensor([[5, 9, 17, 33, 1], [7, 12, 1, 0, 0]])
    dec_in = decoder_input(torch.tensor([[4, 8, 15, 16], [23, 42, 3, 1]]), 0)
    with torch.no_grad():
        theirs = exported(input_ids=src, attention_mask=(src != 0).long(), decoder_input_ids=dec_in).logits
        mine, _ = ours(src, dec_in)
    assert (mine[..., 1:] - theirs[..., 1:]).abs().max() <= 1e-5 * theirs.abs().max()
    tuned = torch.load(policy, weights_only=True)["model"]
    untouched = Transformer.from_pretrained(checkpoint).state_dict()
    assert any(not torch.equal(tuned[k], untouched[k]) for k in untouched)  # RL moved the weights


@pytest.mark.parametrize("line, message", [
    ("not json", ":3: not a JSON object"),
    ('{"response": "no prompt"}', ':3: needs a non-empty string "prompt"'),
    ('{"prompt": 7}', ':3: needs a non-empty string "prompt"'),
    ('{"prompt": "ok", "response": ["a"]}', ':3: "response" must be a string'),
])
def test_a_bad_user_record_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in user_records(2)] + [line]) + "\n")
    with pytest.raises(DataError) as err:
        records("train", path)
    assert str(err.value).startswith(str(path) + message) and "\n" not in str(err.value)


def test_bad_user_data_is_one_line_with_exit_2_before_anything_is_written(checkpoint, tmp_path):
    """Through the command line: a prompt longer than the checkpoint reads, a record without a response
    for SFT, an empty file."""
    too_long = tmp_path / "long.jsonl"
    long_record = {"prompt": "word " * 600, "response": "too long"}
    too_long.write_text("".join(json.dumps(r) + "\n" for r in [*user_records(2), long_record]))
    run = tmp_path / "run"
    proc = run_cli("sft", "--init", str(checkpoint), "--data", str(too_long), "--out", str(run), "--steps", "1")
    assert_one_line_error(proc, f"{too_long}:3: prompt has")
    assert proc.returncode == 2 and not run.exists()
    prompts_only = tmp_path / "prompts.jsonl"
    prompts_only.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in user_records(20)))
    proc = run_cli("sft", "--init", str(checkpoint), "--data", str(prompts_only), "--out", str(tmp_path / "b"))
    assert_one_line_error(proc, f"{prompts_only}:1: no \"response\"")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no records"):
        records("train", empty)


def test_a_folder_that_is_not_a_checkpoint_is_one_line(tmp_path, data):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    proc = run_cli("rl", "--init", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, "config.json", "not a T5-family model")
    assert proc.returncode == 2
