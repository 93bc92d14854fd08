"""The text trainer end to end through ``flowrl train``: outputs, resume exactness, config errors, learning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowrl.cli import build_config, main
from tests.helpers import nan_losses

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "text" / "arithmetic_tiny.yaml")
FAST = ["--config", CONFIG, "--sft_warmup_steps", "20", "--eval_steps", "0", "--prompts_per_step", "4",
        "--group_size", "4", "--sample_batch_size", "8", "--report_to", "none"]


def records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_text_config_dispatch_and_errors(tmp_path, capsys):
    cfg = build_config(["--config", CONFIG])
    assert cfg.modality == "text" and cfg.text.lm_name_or_path == "tiny" and cfg.text.loss_type == "dapo"
    assert main(["train", "--config", CONFIG, "--loss_type", "sum", "--output_dir", str(tmp_path)]) == 2
    assert "loss_type" in capsys.readouterr().err
    assert main(["train", "--config", CONFIG, "--reward", "jpeg_compressibility", "--output_dir", str(tmp_path)]) == 2
    assert "unknown text reward" in capsys.readouterr().err
    assert main(["train", "--config", CONFIG, "--lm_name_or_path", str(tmp_path / "nope"),
                 "--output_dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--config", CONFIG, "--lm_name_or_path", str(tmp_path), "--gguf_file", "x.gguf",
                 "--output_dir", str(tmp_path)]) == 2
    assert "gguf_file 'x.gguf' not found" in capsys.readouterr().err
    assert main(["train", "--config", CONFIG, "--lm_name_or_path", "package:no_such_pkg_xyz",
                 "--output_dir", str(tmp_path)]) == 2
    assert "not installed" in capsys.readouterr().err
    assert main(["train", "--config", CONFIG, "--temperature", "0", "--output_dir", str(tmp_path)]) == 2
    assert "temperature" in capsys.readouterr().err


def test_train_writes_checkpoints_metrics_and_final(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--max_train_steps", "2", "--checkpointing_steps", "1", "--checkpoints_total_limit",
                 "5", "--output_dir", str(out), "--dynamic_sampling", "true", "--beta", "0.02"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    ck = out / "checkpoint-2"
    assert (ck / "trainable.safetensors").is_file() and (ck / "optimizer.bin").is_file()
    assert json.loads((ck / "flowrl_state.json").read_text())["step"] == 2
    recs = records(out)
    assert [r["step"] for r in recs] == [1, 2]
    assert {"reward/exact_answer/mean", "train/loss", "train/ratio_mean", "train/kl", "completion/mean_length",
            "train/sampling_rounds"} <= set(recs[0])
    assert recs[0]["train/ratio_mean"] == pytest.approx(1.0)  # one update per step: on-policy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "final")  # the full tiny model, loadable as lm_name_or_path
    assert AutoTokenizer.from_pretrained(out / "final").decode([3, 4]) == "01"


def test_resume_is_exact(tmp_path):
    args = [*FAST, "--checkpointing_steps", "1", "--checkpoints_total_limit", "3", "--num_inner_epochs", "2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *args, "--max_train_steps", "3", "--output_dir", str(a)]) == 0
    assert main(["train", *args, "--max_train_steps", "2", "--output_dir", str(b)]) == 0
    assert main(["train", *args, "--max_train_steps", "3", "--output_dir", str(b),
                 "--resume_from_checkpoint", "latest"]) == 0
    wa = load_file(str(a / "checkpoint-3" / "trainable.safetensors"))
    wb = load_file(str(b / "checkpoint-3" / "trainable.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert [r["step"] for r in records(b)] == [1, 2, 3]
    ra, rb = records(a), records(b)
    assert ra[2]["reward/mean"] == rb[2]["reward/mean"]


@pytest.mark.slow
def test_tiny_config_accuracy_rises(tmp_path):
    """The shipped tiny config: greedy accuracy on the training problems starts low (the warm-up taught an
    off-by-one habit) and GRPO on the exact-answer reward fixes it within a few CPU-seconds."""
    from flowrl.text_trainer import TextTrainer

    cfg = build_config(["--config", CONFIG, "--output_dir", str(tmp_path), "--max_train_steps", "15",
                        "--eval_steps", "15", "--checkpointing_steps", "0"])
    trainer = TextTrainer(cfg)
    final = trainer.train()
    recs = records(tmp_path)
    before = recs[0]
    assert before["step"] == 0
    assert before["eval/accuracy"] < 0.4
    assert final["eval/accuracy"] >= 0.7, final
    assert final["eval/accuracy"] > before["eval/accuracy"] + 0.3
    assert final["heldout/accuracy"] > before["heldout/accuracy"]


def _nan_text_losses(monkeypatch, which):
    """Make the text loss NaN on the calls (0-based, in order) for which ``which(i)`` is true."""
    import flowrl.text_trainer as tt

    return nan_losses(monkeypatch, tt, "text_policy_loss", which)


def test_nan_loss_is_skipped_with_a_counted_warning(tmp_path, monkeypatch):
    """2 micro-batches per step (16 completions / 8): the first micro-batch's loss of step 1 is NaN -> skipped with a
    warning, counted, the run goes on and the logged loss stays finite."""
    from flowrl.text_trainer import TextTrainer

    calls = _nan_text_losses(monkeypatch, lambda i: i == 0)
    out = tmp_path / "run"
    cfg = build_config([*FAST, "--max_train_steps", "2", "--checkpointing_steps", "0", "--output_dir", str(out)])
    with pytest.warns(RuntimeWarning, match=r"non-finite loss .* skipped \(1 skipped in all, 1 in a row\)"):
        TextTrainer(cfg).train()
    assert calls["n"] == 4
    recs = records(out)
    assert [r["train/nan_loss_skips"] for r in recs] == [1, 1]
    assert all(r["train/loss"] == r["train/loss"] for r in recs)
    assert (out / "final").is_dir()


def test_text_run_stops_after_max_nan_skips_in_a_row(tmp_path, monkeypatch):
    from flowrl.text_trainer import TextTrainer

    # isolated NaNs (every other loss) never stop the run ...
    _nan_text_losses(monkeypatch, lambda i: i % 2 == 0)
    cfg = build_config([*FAST, "--max_train_steps", "2", "--checkpointing_steps", "0", "--max_nan_skips", "2",
                        "--output_dir", str(tmp_path / "a")])
    with pytest.warns(RuntimeWarning):
        TextTrainer(cfg).train()
    assert records(tmp_path / "a")[-1]["train/nan_loss_skips"] == 2  # of 4 losses (2 steps x 2 micro-batches)
    # ... a streak of max_nan_skips does, with a clear error
    _nan_text_losses(monkeypatch, lambda i: i >= 1)
    cfg = build_config([*FAST, "--max_train_steps", "5", "--checkpointing_steps", "0", "--max_nan_skips", "3",
                        "--output_dir", str(tmp_path / "b")])
    with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match=r"3 non-finite losses in a row"):
        TextTrainer(cfg).train()
