"""model=hf_lm: a transformers causal LM scoring a stream's tokens through its text form
(cl_toolkit/models/hf_lm.py), on a tiny random GPT-2 and a BPE tokenizer built offline here."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from cl_toolkit.benchmarks import kv_interference, mqar

from cl_toolkit.errors import ConfigError

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")  # the [hf] extra
from cl_toolkit.models.hf_lm import EMPTY_SCORE, hf_lm, import_transformers

MQAR = {"vocab_size": 32, "seq_len": 16, "num_pairs": [2, 4], "probe_pairs": [2, 4],
        "train_size": 24, "test_size": 8, "probe_size": 8}


def kv_stream(**kw):
    return kv_interference.kv_interference_stream(
        **{"train_updates": (1, 2), "train_size": 16, "test_size": 8, "probe_size": 8,
           "probe_updates": (1, 2), "probe_keys": (1, 2), "probe_keys_fixed_total": (2,),
           "total_updates": 4, **kw})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer, 32-dim GPT-2 with random weights and a byte-level BPE tokenizer trained on the
    streams' text (small enough that many stream tokens become several LM tokens), saved."""
    tr = import_transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = ["".join(s.token_text[i] for i in x.tolist())
             for s in (kv_stream(), mqar.mqar_stream(**MQAR)) for x in s[0].train.x]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = tr.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                      eos_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("tiny_gpt2")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = tr.GPT2Config(vocab_size=len(fast), n_positions=256, n_embd=32, n_layer=2,
                           n_head=2, bos_token_id=fast.bos_token_id,
                           eos_token_id=fast.eos_token_id)
    tr.GPT2LMHeadModel(config).save_pretrained(path)
    return path, fast


def oracle(lm, fast, text, x):
    """Per position i and candidate v: the sum of log p(v's tokens | BOS + the pieces of
    x[0..i] + v's earlier tokens), one full float64 forward per (i, v), no mask, no padding."""
    lm = lm.double().eval()
    pieces = [fast.encode(t, add_special_tokens=False) if t else [] for t in text]
    out = torch.zeros(len(x), len(text), dtype=torch.float64)
    for i in range(len(x)):
        prefix = [fast.bos_token_id] + [t for v in x[:i + 1].tolist() for t in pieces[v]]
        for v, piece in enumerate(pieces):
            if not piece:
                out[i, v] = EMPTY_SCORE
                continue
            with torch.no_grad():
                logits = lm(torch.tensor([prefix + piece])).logits[0]
            logp = torch.log_softmax(logits, -1)
            out[i, v] = sum(logp[len(prefix) - 1 + j, tok] for j, tok in enumerate(piece))
    return out


def test_scores_are_the_lms_log_probabilities_of_each_candidates_tokens(tiny):
    path, fast = tiny
    stream = kv_stream()
    model = hf_lm(stream, str(path)).eval()
    assert model.num_nodes > 0 and model.packed  # multi-token candidates, one packed pass
    x = stream[0].test.x[:2]
    x = x[:, (x[0] == 0).sum():]  # the first row's padding off: a row with and without it
    expect = oracle(transformers.AutoModelForCausalLM.from_pretrained(path), fast,
                    stream.token_text, x[0])
    with torch.no_grad():
        for packed in (True, False):  # the one-pass trie and the per-row recomputation
            got = model._scores(x, packed)
            assert torch.allclose(got[0].double(), expect, atol=2e-4), packed
            assert got[0].argmax(-1).tolist() == expect.argmax(-1).tolist()


def test_left_padding_and_batch_neighbours_leave_scores_unchanged(tiny):
    path, _ = tiny
    stream = kv_stream()
    model = hf_lm(stream, str(path), micro_batch=3).eval()
    x = kv_interference.sample(3, 48, 8, 2, 1, torch.Generator().manual_seed(1))[0]  # L = 6
    long = kv_interference.sample(1, 48, 8, 2, 3, torch.Generator().manual_seed(2))[0]
    padded = torch.cat([torch.nn.functional.pad(x, (long.shape[1] - x.shape[1], 0)), long])
    with torch.no_grad():
        alone, batch = model(x), model(padded)
    assert torch.allclose(batch[:3, -x.shape[1]:], alone, atol=1e-5)
    assert torch.allclose(batch[3], model(long)[0], atol=1e-5)


def test_training_through_the_scores_raises_the_answers_probability(tiny):
    path, _ = tiny
    stream = kv_stream()
    model = hf_lm(stream, str(path)).eval()  # no dropout: the same batch, a falling loss
    data = stream[0].train
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(data.x).flatten(0, 1), data.y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_cli_runs_kv_interference_end_to_end(tiny, tmp_path):
    from cl_toolkit.cli import main

    path, _ = tiny
    assert main(["run", "benchmark=kv_interference", "model=hf_lm", f"model.model_name={path}",
                 "smoke=true", "quiet=true", "threads=1", f"output_root={tmp_path}",
                 "benchmark.probe_updates=[1,4]", "benchmark.probe_keys=[1,2]",
                 "benchmark.probe_keys_fixed_total=[2]", "benchmark.probe_orders=[random]"]) == 0
    (res,) = (tmp_path / "kv_interference").rglob("results.json")
    results = json.loads(res.read_text())
    pi = results["extras"]["kv_interference"]
    assert pi["updates"] == [1, 4] and len(pi["by_updates"]["accuracy"]) == 2
    assert results["config"]["model"]["model_name"] == str(path)


def test_mqar_and_the_retention_probe_on_fortunes_run(tiny, tmp_path):
    """The probe uses only predict / train_step, so it runs on hf_lm unchanged."""
    from cl_toolkit.runner import run

    path, _ = tiny
    model = {"name": "hf_lm", "model_name": str(path)}
    strategy = {"name": "naive", "epochs": 1, "batch_size": 8, "lr": 1e-3, "optimizer": "adam"}
    out = run({"seed": 0, "threads": 1, "benchmark": {"name": "mqar", **MQAR}, "model": model,
               "strategy": strategy}, tmp_path / "mqar")
    assert out["extras"]["mqar"]["num_pairs"] == [2, 4]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a", "b"):
        (corpus / name).write_text("\n%\n".join(
            f"quote {i} of file {name}, short and plain." for i in range(120)) + "\n%\n")
    probe = {"name": "retention", "study_after": None, "n_study": 2, "length": 8,
             "exposures": [1], "schedule": [0, 1], "stimuli": ["fortunes", "random"],
             "retention_corpus": "stream", "path": str(corpus), "files": ["a", "b"]}
    out = run({"seed": 0, "threads": 1, "model": model, "strategy": strategy, "probe": probe,
               "benchmark": {"name": "fortunes", "files": ["a", "b"], "path": str(corpus),
                             "seq_len": 16, "max_train": 16, "max_test": 4}},
              tmp_path / "fortunes")
    points = out["extras"]["retention"]["points"]
    assert {(p["k"], p["updates"], p["stimuli"], p["set"]) for p in points} == {
        (1, u, kind, s) for u in (0, 1) for kind in ("fortunes", "random")
        for s in ("studied", "control")}
    assert all(0 <= p["recognition"] <= 1 for p in points)


def test_missing_weights_offline_fail_at_once_with_exit_2(tmp_path, capsys):
    from cl_toolkit.cli import main

    code = main(["run", "benchmark=kv_interference", "model=hf_lm",
                 "model.model_name=no-such-org/no-such-model", "smoke=true", "quiet=true",
                 f"output_root={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "no-such-org/no-such-model" in err and "HF_HUB_OFFLINE" in err
    assert "Traceback" not in err and "hf download" in err


def test_bad_inputs_are_config_errors(tiny, tmp_path):
    path, fast = tiny
    stream = kv_stream()
    with pytest.raises(ConfigError, match="no text form"):
        hf_lm(dataclasses.replace(stream, token_text=None), str(path))
    transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=1, intermediate_size=16).save_pretrained(
        tmp_path / "bert")
    with pytest.raises(ConfigError, match="'bert' model, not a causal language model"):
        hf_lm(stream, str(tmp_path / "bert"))
    short = tmp_path / "short"
    fast.save_pretrained(short)
    transformers.GPT2Config(vocab_size=len(fast), n_positions=16, n_embd=8, n_layer=1,
                            n_head=1, bos_token_id=0, eos_token_id=0).save_pretrained(short)
    with pytest.raises(ConfigError, match=r"context of 16 positions \(config.n_positions\).*"
                                          r"benchmark.num_keys"):
        hf_lm(stream, str(short), pretrained=False)
    text = list(stream.token_text)
    text[10] = text[9] + "\n"  # ": 01" and ": 01\n": one's LM tokens a prefix of the other's
    with pytest.raises(ConfigError, match="one a prefix of the other"):
        hf_lm(dataclasses.replace(stream, token_text=tuple(text)), str(path))
    text[10] = text[9]
    with pytest.raises(ConfigError, match="the same LM tokens"):
        hf_lm(dataclasses.replace(stream, token_text=tuple(text)), str(path))
    with pytest.raises(ConfigError, match="looks like a path"):
        hf_lm(stream, str(tmp_path / "nowhere") + "/")
