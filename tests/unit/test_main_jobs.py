"""The main jobs' parts without a collective: the language-model job's standard-library corpus and
its split by file, the byte-level GPT, the task's batches, evaluation and learning-rate schedule;
the flags' defaults per job and the codec they build."""

import argparse
import math
import zlib

import pytest
import torch

import hvdquant
from hvdquant.data import load_stdlib_text
from hvdquant.examples.frameworks import make_codec
from hvdquant.examples.gpt import ByteGPT
from hvdquant.examples.tasks import StdlibLMTask
from hvdquant.examples.train import parse_args


def write_tree(root, files: dict[str, bytes]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text)


def test_split_is_by_file_and_keyed_by_path(tmp_path):
    files = {f"pkg{i % 3}/mod{i}.py": f"x = {i}\n".encode() * (i + 1) for i in range(40)}
    files |= {"site-packages/other.py": b"skipped", "test/test_x.py": b"skipped", "notes.txt": b"not python"}
    write_tree(tmp_path, files)
    corpus = load_stdlib_text(tmp_path, validation_share=4)
    validation = [rel for rel in sorted(files) if rel.startswith("pkg") and zlib.crc32(rel.encode()) % 4 == 0]
    assert 0 < len(validation) < 40 and len(corpus.train) == 40 - len(validation)
    assert corpus.validation == b"\0".join(files[rel] for rel in validation)
    assert b"skipped" not in corpus.validation and all(b"skipped" not in f for f in corpus.train)
    # another file added elsewhere moves no file between the splits
    write_tree(tmp_path, {"pkg9/new.py": b"y = 1\n"})
    again = load_stdlib_text(tmp_path, validation_share=4)
    assert set(corpus.train) <= set(again.train) and corpus.validation in again.validation


def test_empty_or_one_sided_corpus_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.py files"):
        load_stdlib_text(tmp_path)
    write_tree(tmp_path, {"only.py": b"a = 1\n"})
    with pytest.raises(ValueError, match="empty training or validation split"):
        load_stdlib_text(tmp_path)


def test_the_standard_library_gives_megabytes_in_both_splits():
    corpus = load_stdlib_text()
    assert corpus.train_bytes > 2_000_000 and len(corpus.validation) > 100_000
    assert len(corpus.validation) < corpus.train_bytes / 3


def test_gpt_is_causal_and_ties_its_output_layer():
    torch.manual_seed(0)
    model = ByteGPT(layers=2, width=32, heads=4, context=16).eval()
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    out, out_changed = model(tokens), model(changed)
    assert out.shape == (2, 16, 256)
    assert torch.equal(out[:, :10], out_changed[:, :10]) and not torch.equal(out[:, 10:], out_changed[:, 10:])
    names = [n for n, _ in model.named_parameters()]
    assert "embed.weight" in names and not any("head" in n for n in names)
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="not a multiple of heads"):
        ByteGPT(width=30, heads=4)


def lm_args(**overrides) -> argparse.Namespace:
    args = parse_args(["--job", "lm", "--steps", "40", "--eval-every", "10", "--context", "32", "--eval-windows", "8"])
    return argparse.Namespace(**{**vars(args), **overrides})


def test_batches_are_windows_of_the_rank_shard_with_next_byte_targets():
    args = lm_args()
    task = StdlibLMTask(args, rank=1, size=2)
    assert task.rounds == 4 and task.steps_per_round == 10
    batches = list(task.batches(1))
    assert len(batches) == 10
    x, y = batches[0]
    assert x.shape == y.shape == (16, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    shard = bytes(task.shard.numpy())
    assert all(bytes(x[i].tolist()) + bytes(y[i, -1:].tolist()) in shard for i in range(4))
    again = list(StdlibLMTask(args, rank=1, size=2).batches(1))[0][0]
    other_rank = list(StdlibLMTask(args, rank=0, size=2).batches(1))[0][0]
    assert torch.equal(again, x) and not torch.equal(other_rank, x)


def test_untrained_model_scores_near_a_uniform_byte():
    args = lm_args()
    task = StdlibLMTask(args, rank=0, size=1)
    torch.manual_seed(0)
    metrics = task.evaluate(task.model())
    assert abs(metrics["validation_loss"] - math.log(256)) < 0.1  # 0.02-std init: near-uniform logits
    assert metrics["bits_per_byte"] == pytest.approx(metrics["validation_loss"] / math.log(2))


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    task = StdlibLMTask(lm_args(steps=1000, eval_every=100), rank=0, size=1)
    factors = [task.lr_factor(s) for s in range(1000)]
    assert factors[0] == pytest.approx(1 / 50) and factors[49] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[49:], factors[50:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-4)


def test_job_defaults_follow_the_job():
    cnn, lm = parse_args([]), parse_args(["--job", "lm"])
    assert (cnn.batch_size, cnn.lr, cnn.reducer) == (64, 0.02, "stock")
    assert (lm.batch_size, lm.lr, lm.steps, lm.eval_every) == (16, 0.002, 3000, 250)


def test_error_feedback_wraps_the_quantizers_on_payload_paths_only(capsys):
    codec = make_codec(parse_args(["--job", "lm", "--compression", "qsgd", "--levels", "1", "--error-feedback"]))
    assert codec == hvdquant.ErrorFeedback(hvdquant.QSGD(1, 512, "l2", "elias"))
    assert make_codec(parse_args(["--compression", "dqsg", "--reducer", "allgather"])) == hvdquant.DQSG(1, 512)
    for flags in (["--compression", "dqsg"], ["--compression", "topk", "--reducer", "allgather"],
                  ["--framework", "ddp", "--compression", "ndqsg"]):
        with pytest.raises(SystemExit):
            parse_args([*flags, "--error-feedback"])
        assert "--error-feedback takes" in capsys.readouterr().err
