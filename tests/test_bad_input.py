"""Bad input, table-driven: every case must end in ONE paragraph that names the problem (the
key or path) and the fix, exit code 2, and no traceback; nothing may run or be written first.

Cases run in this process through `cl_toolkit.cli.main` (as the ``cltk`` entry point does);
one case also runs as a subprocess to check the exit status a shell sees and that
``HYDRA_FULL_ERROR=1`` brings the traceback back.
"""
from __future__ import annotations

import os
import sys

import pytest

from cl_toolkit.cli import _flags_first, main
from cltk_subprocess import cltk

# (id, arguments after `cltk`, words the message must contain: the problem and the fix)
CASES = [
    ("kcl_on_tokens", ["run", "strategy=kcl", "benchmark=mqar", "model=gdn_lm", "smoke=true"],
     ["strategy=kcl", "tokens", "classification", "naive"]),
    ("merge_ta_on_tokens", ["run", "strategy=merge_ta", "benchmark=mqar", "model=gdn_lm",
                            "smoke=true"], ["strategy=merge_ta", "tokens", "replay"]),
    ("avalanche_on_tokens", ["run", "strategy=avalanche", "benchmark=fortunes", "model=gdn_lm",
                             "smoke=true"], ["strategy=avalanche", "tokens", "joint"]),
    ("retention_with_merging", ["run", "strategy=merge_average", "probe=retention"],
     ["probe=retention", "train_step", "strategy=merge_average", "naive"]),
    ("buffer_size<0", ["run", "strategy=replay", "strategy.buffer_size=-5"],
     ["strategy.buffer_size", ">= 0", "-5"]),
    ("scenario_typo", ["run", "benchmark.scenario=class_il"],
     ["benchmark.scenario", "class-il", "task-il"]),
    ("lr<0", ["run", "strategy.lr=-0.1"], ["strategy.lr", "> 0", "-0.1"]),
    ("dropout>1", ["run", "model.dropout=1.5"], ["model.dropout", "< 1", "1.5"]),
    ("lr_text", ["run", "strategy.lr=abc"], ["strategy.lr", "a number", "'abc'"]),
    ("seed_text", ["run", "seed=abc"], ["seed", "an integer", "seed=0"]),
    ("buffer_text", ["run", "strategy=replay", "strategy.buffer_size=abc"],
     ["strategy.buffer_size", "an integer", "'abc'"]),
    ("hidden_text", ["run", "model.hidden=abc"], ["model.hidden", "a list", "[256, 256]"]),
    ("batch_size=0", ["run", "strategy.batch_size=0"], ["strategy.batch_size", ">= 1"]),
    ("eval_batch_size=0", ["run", "eval_batch_size=0"], ["eval_batch_size", ">= 1"]),
    ("threads<0", ["run", "threads=-1"], ["threads", ">= 1"]),
    ("device_gpu", ["run", "device=gpu"], ["device='gpu'", "device=cpu"]),
    ("epochs<0", ["run", "strategy.epochs=-1"], ["strategy.epochs", ">= 0", "-1"]),
    ("epochs=0", ["run", "strategy.epochs=0"], ["strategy.epochs=0", "trains nothing"]),
    ("unknown_strategy", ["run", "strategy=naiv"], ["'naiv'", "Did you mean 'naive'"]),
    ("unknown_key", ["run", "strategy.lrr=0.1"], ["strategy.lrr", "Did you mean 'lr'"]),
    ("added_unknown_key", ["run", "+strategy.lrr=0.1"], ["strategy.lrr", "Did you mean 'lr'"]),
    ("bad_override_syntax", ["run", "strategy.lr=[1,"], ["Cannot parse the override",
                                                         "key=value"]),
    ("unknown_option", ["run", "--frobnicate"], ["--frobnicate", "cltk run --help"]),
    ("report_missing", ["report", "{tmp}/nowhere"], ["nowhere", "does not exist"]),
    ("report_empty", ["report", "{tmp}/empty"], ["No results.json", "cltk run"]),
    ("output_root_file", ["run", "output_root={tmp}/a_file/runs"], ["a_file", "is a file"]),
    ("output_root_readonly", ["run", "output_root={tmp}/readonly/runs"],
     ["readonly", "not writable"]),
    ("device_cuda_no_gpu", ["run", "device=cuda"], ["device=cuda", "no CUDA GPU", "device=cpu"]),
    ("cifar_download_offline", ["run", "benchmark=split_cifar100", "benchmark.download=true",
                                "benchmark.root={tmp}/cifar", "quiet=true"],
     ["Offline", "cifar-100-python", "benchmark.download=false"]),
    ("avalanche_download_offline",
     ["run", "benchmark=avalanche", "benchmark.factory=SplitMNIST",
      "+benchmark.kwargs.dataset_root={tmp}/avalanche", "quiet=true"],
     ["Offline", "SplitMNIST", "dataset_root"]),
    # Model sizes, checked before smoke=true shrinks them (issue 22, item 4).
    ("hidden_size<1_under_smoke", ["run", "model=mom", "model.hidden_size=-8", "smoke=true"],
     ["model.hidden_size", ">= 1", "-8"]),
    ("num_layers=0", ["run", "benchmark=mqar", "model=gdn_lm", "model.num_layers=0"],
     ["model.num_layers", ">= 1", "embedding"]),
    ("heads_do_not_divide_hidden", ["run", "model=transformer", "model.hidden_size=50",
                                    "model.num_heads=4"],
     ["model.hidden_size=50", "model.num_heads=4", "model.hidden_size=52"]),
    ("aux_loss_weight_nan", ["run", "model=mom", "model.aux_loss_weight=nan"],
     ["model.aux_loss_weight", "finite", "nan"]),
    ("aux_loss_weight<0", ["run", "model=mom", "model.aux_loss_weight=-1"],
     ["model.aux_loss_weight", ">= 0", "-1"]),
    ("memories_per_task_without_routing", ["run", "model=mom", "model.memories_per_task=4"],
     ["model.memories_per_task=4", "model.task_routing=true"]),
    ("task_free_without_task_routing", ["run", "model=mom", "model.task_free=true"],
     ["model.task_free=true", "model.task_routing=true"]),
    ("routing_loss_without_task_routing", ["run", "model=mom", "model.routing_loss_weight=1.0"],
     ["model.routing_loss_weight=1.0", "model.task_routing=true"]),
    ("task_free_without_routing_loss", ["run", "model=mom", "model.task_routing=true",
                                        "model.task_free=true", "model.routing_loss_weight=0"],
     ["model.routing_loss_weight=0", "model.routing_loss_weight > 0"]),
    ("classifier_on_market", ["run", "benchmark=synthetic_market", "model=mlp"],
     ["synthetic_market", "cross_section", "model=mlp", "model=mtmd"]),
    ("market_model_on_images", ["run", "benchmark=split_digits", "model=mtmd"],
     ["split_digits", "classification", "model=mtmd", "cross_section"]),
    ("backend_typo", ["run", "model=mom", "model.backend=trition"],
     ["model.backend='trition'", "Did you mean 'triton'", "model.backend=auto"]),
    ("backend_triton_on_cpu", ["run", "model=mom", "model.backend=triton"],
     ["model.backend=triton", "device=cpu", "model.backend=auto"]),
    ("chunk_size=48", ["run", "model=mom", "model.chunk_size=48"],
     ["model.chunk_size=48", "16, 32, 64, 128"]),
    # Token streams.
    ("train_size=0", ["run", "benchmark=mqar", "model=gdn_lm", "benchmark.train_size=0"],
     ["benchmark.train_size", ">= 1", "0"]),
    ("train_updates_empty", ["run", "benchmark=kv_interference", "model=gdn_lm",
                             "benchmark.train_updates=[]"],
     ["benchmark.train_updates", "at least one value", "[1, 2, 4]"]),
    ("kv_order_typo", ["run", "benchmark=kv_interference", "model=gdn_lm",
                       "benchmark.order=sideways"],
     ["benchmark.order='sideways'", "random, sequential"]),
    ("mqar_vocab_not_above_seq_len", ["run", "benchmark=mqar", "model=gdn_lm",
                                      "benchmark.vocab_size=32", "benchmark.seq_len=64",
                                      "benchmark.num_pairs=[4]"],
     ["benchmark.vocab_size=32", "benchmark.seq_len=64", "Zoology"]),
    ("retention_exposure_typo", ["run", "benchmark=fortunes", "model=gdn_lm", "probe=retention",
                                 "probe.exposure=spaced"],
     ["probe.exposure", "epochs", "massed"]),
    ("retention_stimuli_not_a_list", ["run", "benchmark=fortunes", "model=gdn_lm",
                                      "probe=retention", "probe.stimuli=fortunes"],
     ["probe.stimuli", "a list", "[fortunes, random]"]),
    ("retention_corpus_typo", ["run", "benchmark=fortunes", "model=gdn_lm", "probe=retention",
                               "probe.retention_corpus=wiki"],
     ["probe.retention_corpus", "python_source", "stream"]),
    ("class_il_on_tokens", ["run", "benchmark=mqar", "model=gdn_lm", "benchmark.scenario=class-il"],
     ["benchmark.scenario='class-il'", "token stream", "benchmark.scenario=domain-il"]),
    # Damaged results.json files (tests/report_inputs/, issue 22): refused before writing.
    ("report_no_matrix", ["report", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "report_inputs", "no_matrix"), "-o", "{tmp}/out"],
     ["no_matrix", "no 'matrix'", "never rebuilds a matrix", "leave it out"]),
    ("report_no_config", ["report", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "report_inputs", "no_config"), "-o", "{tmp}/out"],
     ["no_config", "no 'config'", "leave it out"]),
    ("report_bad_extras", ["report", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "report_inputs", "bad_extras"), "-o",
                           "{tmp}/out"],
     ["bad_extras", "extras['mqar'] is malformed", "'accuracy' has 1 values for 2"]),
]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network (downloads fail at once) and the paths the cases refer to."""
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU machine as users have it
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "readonly").mkdir(mode=0o555)
    return tmp_path


@pytest.mark.parametrize("case,argv,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_paragraph_with_exit_code_2(case, argv, words, offline, capsys):
    import torch

    if case == "output_root_readonly" and os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    if case == "device_cuda_no_gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    before = sorted(p.name for p in offline.iterdir())
    argv = [a.replace("{tmp}", str(offline)) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: "), err
    message = err.splitlines()[-1]
    assert len(err.splitlines()) == 1, f"not one paragraph:\n{err}"
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"
    if case not in ("cifar_download_offline", "avalanche_download_offline"):
        assert sorted(p.name for p in offline.iterdir()) == before, "it ran or wrote first"


def test_bad_input_from_a_shell_and_full_error(tmp_path):
    proc = cltk("run", "strategy.lr=-0.1", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: strategy.lr must be > 0")
    proc = cltk("run", "strategy.lr=-0.1", cwd=tmp_path, check=False,
                env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_flags_anywhere_on_the_line():
    """`-m` (and `--cfg job`) after the overrides work, as people type them."""
    assert _flags_first(["seed=0,1", "-m", "strategy=naive"]) == ["-m", "seed=0,1",
                                                                  "strategy=naive"]
    assert _flags_first(["seed=1", "--cfg", "job", "quiet=true"]) == ["--cfg", "job", "seed=1",
                                                                      "quiet=true"]


def test_help_explains_subcommands_and_config_groups(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("cltk run", "cltk report", "cltk list"))
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("strategy: ", "benchmark: ", "model: ", "experiment: ", "naive", "replay",
                 "split_digits", "seed:", "output_root:", "--cfg job", "-m, --multirun"):
        assert text in out, text


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
