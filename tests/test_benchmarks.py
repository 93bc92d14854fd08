"""The benchmark suite end to end in a tiny mode, and the bit-exactness of the batched noise it motivated."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import save_tiny_sd3


def test_batched_noise_is_bit_identical_to_per_sample_noise():
    """flowrl.seeding.gaussians (one vectorised seed derivation, one re-seeded generator) == stacking gaussian(),
    which is == the original fresh-generator-per-sample draw; small shapes (torch's cached-normal path) included."""
    from flowrl.seeding import derive_seed, derive_seeds, gaussian, gaussians

    rng = np.random.default_rng(0)
    for k in (1, 2, 3, 4, 6):
        rows = rng.integers(-(2**40), 2**40, size=(200, k)).tolist() + [[0] * k, [-1] * k, [2**32 - 1] * k]
        assert derive_seeds(rows).tolist() == [derive_seed(*r) for r in rows]
    for shape in [(3, 8, 8), (5,), (16,), (2, 3)]:
        rows = [(7, 3, i, j) for i in range(5) for j in (-1, 0, 2)]
        fresh = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(*r))) for r in rows])
        assert torch.equal(gaussians(shape, rows), fresh)
        assert torch.equal(torch.stack([gaussian(shape, *r) for r in rows]), fresh)
    assert gaussians((2, 2), []).shape == (0, 2, 2)


@pytest.mark.slow
def test_suite_tiny_mode_writes_results_report_and_plots(tmp_path):
    from benchmarks.suite import main

    model = save_tiny_sd3(tmp_path / "tiny-sd3")
    out = tmp_path / "bench"
    rc = main([
        "--output_dir", str(out), "--model", str(model), "--presets", "flow_grpo", "--seeds", "0",
        "--max_train_steps", "1", "--eval_prompts", "2", "--eval_images_per_prompt", "1", "--overhead_reps", "1",
        "--sweep_T", "3", "--sweep_G", "", "--sweep_resolution", "8", "--sweep_reps", "1", "--no_profile",
        "--num_inference_steps", "3",
        # flowrl train flags of every run and probe
        "--prompts_per_step", "2", "--group_size", "2", "--sample_batch_size", "4", "--rank", "4",
    ])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    for key in ("overhead_ratio", "overhead_ratio/sampling", "overhead_ratio/training", "memory_ratio",
                "time_ratio/flow_grpo", "final/equal_iterations/eval/flow_grpo",
                "final/equal_time/heldout/flow_grpo", "nfe_sampling/flow_grpo", "scaling/resolution=8/peak_mb"):
        assert key in res and isinstance(res[key], (int, float)) and math.isfinite(res[key]), key
    assert res["time_ratio/flow_grpo"] == 1.0
    assert res["overhead_ratio"] > 0 and res["memory_ratio"] > 0
    # the trainer counts NFE per sample (2 prompts x 2 samples x 3 steps x CFG 2 = 24); the replay records the rows
    # the transformer really saw: a group shares its initial noise, so the first step's 8 rows are 4 distinct ones
    o = res["details"]["overhead"]
    assert o["trainer_nfe_sampling"] == 24 and o["bare_nfe_sampling"] == 20
    # training: the one trained step is that first step (2 x 2 samples x CFG 2 = 8 per sample, 4 distinct rows)
    assert o["trainer_nfe_training"] == 8 and o["bare_nfe_training"] == 4
    assert res["machine"]["torch"] == torch.__version__ and res["machine"]["cores"]
    report = (out / "report.md").read_text()
    assert res["machine"]["cpu"] in report and "overhead_ratio" in report and "memory_ratio" in report
    for png in ("curves_iterations.png", "curves_time.png", "cost.png", "overhead.png", "scaling.png"):
        assert (out / png).stat().st_size > 1000, png
    assert (out / "runs" / "flow_grpo" / "seed0" / "iterations" / "metrics.jsonl").is_file()
    assert Path(out / "report.md").read_text().count("![") >= 4


def _square_unless_three(x: int) -> int:
    if x == 3:
        raise ValueError("task 3 failed")
    return x * x


def test_run_parallel_keeps_the_task_order_and_raises_a_failing_task_s_error():
    """Two spawned workers: results come back keyed and in submission order; a failing task's exception reaches the
    caller (not a hang, not a partial result); jobs=1 runs in this process with the same results."""
    from benchmarks.common import run_parallel

    tasks = {f"t{i}": (_square_unless_three, (i,)) for i in (2, 0, 1)}
    assert list(run_parallel(tasks, jobs=2).items()) == [("t2", 4), ("t0", 0), ("t1", 1)]
    assert run_parallel(tasks, jobs=1) == {"t2": 4, "t0": 0, "t1": 1}
    with pytest.raises(ValueError, match="task 3 failed"):
        run_parallel({i: (_square_unless_three, (i,)) for i in (1, 3, 2)}, jobs=2)


@pytest.mark.slow
def test_suite_runs_presets_in_parallel_workers_and_reuse_resumes_without_training(tmp_path, monkeypatch):
    """--jobs 2 trains the preset runs in two worker processes, each recorded (run_record.json); a rerun with --reuse
    trains nothing and gives the same figures; a changed flag is a different run that --reuse does not pick up."""
    import benchmarks.suite as suite

    model = save_tiny_sd3(tmp_path / "tiny-sd3")
    out = tmp_path / "bench"
    flags = ["--output_dir", str(out), "--model", str(model), "--sections", "presets", "--presets", "flow_grpo,mixgrpo",
             "--seeds", "0", "--max_train_steps", "2", "--eval_prompts", "2", "--eval_images_per_prompt", "1",
             "--num_inference_steps", "5", "--prompts_per_step", "2", "--group_size", "2", "--sample_batch_size", "4",
             "--rank", "4", "--budget_clock", "cpu"]
    assert suite.main([*flags, "--jobs", "2"]) == 0
    first = json.loads((out / "results.json").read_text())
    assert first["settings"]["jobs"] == 2 and first["details"]["presets"]["jobs"] == 2
    rec = json.loads((out / "runs" / "mixgrpo" / "seed0" / "iterations" / "run_record.json").read_text())
    assert rec["key"]["argv"][:2] == ["--algorithm", "mixgrpo"] and rec["summary"]["iterations"] == 2
    for p in ("flow_grpo", "mixgrpo"):
        assert first["details"]["presets"]["equal_iterations"][p]["0"]["iterations"] == 2
        assert math.isfinite(first[f"final/equal_time/eval/{p}"])
    assert "2 at a time" in (out / "report.md").read_text()

    def no_training(*a, **k):
        raise AssertionError("--reuse trained a finished run again")

    monkeypatch.setattr(suite, "train_run", no_training)
    assert suite.main([*flags, "--reuse"]) == 0
    again = json.loads((out / "results.json").read_text())
    for key in ("time_ratio/mixgrpo", "nfe_sampling_ratio/mixgrpo", "final/equal_iterations/eval/mixgrpo",
                "final/equal_time/heldout/mixgrpo", "gain/equal_iterations/heldout/flow_grpo", "time_budget_s"):
        assert again[key] == first[key], key
    with pytest.raises(AssertionError, match="trained a finished run again"):
        suite.main([*flags, "--reuse", "--learning_rate", "2e-4"])


def test_gradient_snr_statistics_by_construction():
    """g_k = mu + n_k with |mu|^2 = 4 and E|n|^2 = 400 (SNR 0.01), many draws: the unbiased estimates recover both;
    pure noise gives snr ~ 0 and pair_cos ~ 0; identical draws give pair_cos 1 and infinite snr."""
    from benchmarks.grad_snr import gradient_snr

    torch.manual_seed(0)
    P, K = 40_000, 64
    mu = torch.zeros(P)
    mu[:4] = 1.0  # |mu|^2 = 4
    noise = torch.randn(K, P) * (400 / P) ** 0.5  # E|n|^2 = 400
    s = gradient_snr(mu + noise)
    assert s["k"] == K
    assert s["noise_norm2"] == pytest.approx(400, rel=0.02)
    assert s["signal_norm2"] == pytest.approx(4, abs=0.8)
    assert s["snr"] == pytest.approx(0.01, abs=0.002)
    assert s["pair_cos"] == pytest.approx(0.01 / 1.01, abs=0.002)
    pure = gradient_snr(noise)
    assert abs(pure["snr"]) < 0.002 and abs(pure["pair_cos"]) < 0.002
    same = gradient_snr(mu.expand(3, P).clone())
    assert same["pair_cos"] == pytest.approx(1.0) and same["snr"] == math.inf
    with pytest.raises(ValueError, match=r"\[K >= 2, P\].*\(1, 3\)"):
        gradient_snr(torch.ones(1, 3))


@pytest.mark.slow
def test_module_groups_and_grouped_snr_by_hand():
    """Block indices collapse into module kinds (plus one group per block); each group's statistics are those of its
    own columns, and the squared-norm shares of the kinds add up to 1."""
    from benchmarks.grad_snr import grouped_snr, module_groups

    names = ["pos_embed.proj.weight", "transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_q.bias",
             "transformer_blocks.1.attn.to_q.weight", "proj_out.weight"]
    groups = module_groups(names, [2, 3, 1, 3, 4])
    assert groups == {"pos_embed.proj": [(0, 2)], "<transformer_blocks>.attn.to_q": [(2, 5), (5, 6), (6, 9)],
                      "transformer_blocks.0": [(2, 5), (5, 6)], "transformer_blocks.1": [(6, 9)],
                      "proj_out": [(9, 13)]}
    g = torch.zeros(2, 13)
    g[:, 0:2] = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # pos_embed: identical draws -> cosine 1
    g[:, 9:13] = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]])  # proj_out: opposite draws -> cosine -1
    g[0, 2], g[1, 3] = 2.0, 2.0  # to_q (block 0): orthogonal draws -> cosine 0
    res = grouped_snr(g, groups)
    assert res["pos_embed.proj"]["pair_cos"] == pytest.approx(1.0)
    assert res["proj_out"]["pair_cos"] == pytest.approx(-1.0)
    assert res["<transformer_blocks>.attn.to_q"]["pair_cos"] == pytest.approx(0.0)
    assert res["<transformer_blocks>.attn.to_q"]["params"] == 7 and res["transformer_blocks.1"]["params"] == 3
    assert res["<transformer_blocks>.attn.to_q"]["norm2_share"] == pytest.approx(8 / 12)  # |g|^2 = 2 + 2 + 8
    assert sum(res[k]["norm2_share"] for k in ("pos_embed.proj", "<transformer_blocks>.attn.to_q", "proj_out")) \
        == pytest.approx(1.0)


def test_grad_snr_cli_on_a_tiny_model(tmp_path):
    from benchmarks.grad_snr import main as snr_main

    model = save_tiny_sd3(tmp_path / "tiny-sd3")
    out = tmp_path / "snr"
    rc = snr_main(["--batches", "3", "--out", str(out), "--pretrained_model_name_or_path", str(model),
                   "--prompts_per_step", "2", "--group_size", "2", "--sample_batch_size", "2", "--rank", "4",
                   "--num_inference_steps", "3", "--variant", "default=", "--variant", "anti=--antithetic_noise true",
                   "--by_module"])
    assert rc == 0
    res = json.loads((out / "grad_snr.json").read_text())
    assert [v["name"] for v in res["variants"]] == ["default", "anti"]
    for v in res["variants"]:
        assert v["k"] == 3 and v["params"] > 0 and -1 <= v["pair_cos"] <= 1 and math.isfinite(v["snr"])
        assert v["noise_norm2"] > 0  # different batches give different gradients
        kinds = {m: r for m, r in v["modules"].items() if not m[-1].isdigit()}  # module kinds, not blocks
        assert sum(r["params"] for r in kinds.values()) == v["params"]  # the kinds partition the gradient
        assert sum(r["norm2_share"] for r in kinds.values()) == pytest.approx(1.0)
        assert any(m.startswith("<transformer_blocks>.attn.to_q.lora_A") for m in kinds)
        assert v["modules"]["transformer_blocks.0"]["params"] > 0
    with pytest.raises(SystemExit, match="NAME=FLAGS"):
        snr_main(["--out", str(out), "--variant", "no-equals-sign"])


def test_grad_snr_fixed_prompts_varies_only_the_noise(tmp_path):
    """--fixed_prompts: every batch has the first batch's prompts (the draws differ without it), the gradients still
    differ (the noise does), and the trainer's own prompt stream is back afterwards."""
    from benchmarks.common import make_config
    from benchmarks.grad_snr import batch_gradients
    from flowrl.trainer import Trainer

    model = save_tiny_sd3(tmp_path / "tiny-sd3")
    cfg = make_config(["--output_dir", str(tmp_path / "run"), "--report_to", "none", "--eval_steps", "0",
                       "--checkpointing_steps", "0", "--pretrained_model_name_or_path", str(model),
                       "--prompts_per_step", "2", "--group_size", "2", "--sample_batch_size", "2", "--rank", "4",
                       "--num_inference_steps", "3"])
    trainer = Trainer(cfg)
    trainer.setup()
    seen = []
    sample = trainer.sample_and_score

    def spy(step):
        batch, t = sample(step)
        seen.append(list(batch.prompts))
        return batch, t

    trainer.sample_and_score = spy
    free, _ = batch_gradients(trainer, 4, first_step=7)
    assert len({tuple(p) for p in seen}) > 1  # the prompt stream moves from batch to batch
    seen.clear()
    fixed, rewards = batch_gradients(trainer, 3, first_step=7, fixed_prompts=True)
    assert seen == [trainer.step_prompts(7)[0]] * 3
    assert fixed.shape == (3, free.shape[1]) and len(rewards) == 3
    assert not torch.equal(fixed[0], fixed[1]) and not torch.equal(fixed[1], fixed[2])  # the noise still differs
    assert torch.equal(fixed[0], free[0])  # batch 0 is the same draw either way
    assert "step_prompts" not in vars(trainer)  # the shadowing is undone


def test_report_mean_pm_std_formatting():
    """Gains keep their sign; the std never carries one; a missing std shows the mean alone."""
    from benchmarks.report import _pm

    assert _pm(-0.012, 0.0123, "+.3f") == "-0.012 ± 0.012"
    assert _pm(0.4, 0.01) == "0.400 ± 0.010"
    assert _pm(0.4, math.nan) == "0.400" and _pm(math.nan, 0.1) == "n/a"


def test_peak_meter_on_cuda_reads_the_allocator_peak_of_each_phase(monkeypatch):
    """On a CUDA device the memory probe measures torch's allocator (device memory), not host RSS: the peak of each
    phase above the allocated base, with the peak counter reset at every phase boundary (a fake allocator here)."""
    from benchmarks import probe

    mib = 1024 * 1024
    state = {"alloc": 100 * mib, "peak": 100 * mib, "resets": 0, "syncs": 0}

    def reset(device=None):
        state["resets"] += 1
        state["peak"] = state["alloc"]

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: state.__setitem__("syncs", state["syncs"] + 1))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["alloc"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    meter = probe.PeakMeter("cuda:0")
    meter.start()
    meter.between("sampling")
    state["peak"] = 350 * mib  # sampling's activations
    meter.between("training")
    state["peak"] = 180 * mib  # after the reset, training peaks lower
    meter.stop()
    assert meter.peaks == {"sampling": 250 * mib, "training": 80 * mib}
    assert state["resets"] == 3 and state["syncs"] >= 3 and "max_memory_allocated" in meter.method
    cpu = probe.PeakMeter("cpu")
    assert not cpu.cuda and "VmHWM" in cpu.method


def test_sd35m_architecture_replica_loads_and_times_through_the_probe(tmp_path):
    """benchmarks.arch writes a random-weight pipeline with SD3.5-M's published transformer and SD3's VAE configs
    (shrunk for the test: the same code path), loadable by a stock diffusers pipeline, and the step-time probe runs on
    it with the SD3.5-M Flow-GRPO config (CFG in training, the KL's reference pass)."""
    from diffusers import StableDiffusion3Pipeline

    from benchmarks.arch import ARCHITECTURES
    from benchmarks.arch import main as arch_main
    from benchmarks.probe import main as probe_main

    full = ARCHITECTURES["sd35m"]
    assert full.transformer["num_layers"] == 24 and full.transformer["dual_attention_layers"] == tuple(range(13))
    assert full.transformer["num_attention_heads"] * full.transformer["attention_head_dim"] == 1536
    with torch.device("meta"):
        from diffusers import SD3Transformer2DModel

        n = sum(p.numel() for p in SD3Transformer2DModel(**full.transformer).parameters())
    assert 2.24e9 < n < 2.25e9  # + the 384 x 384 x 1536 position table = 2.47B values, as in the released weights

    out = tmp_path / "sd35m"
    assert arch_main(["--arch", "sd35m", "--shrink", "8", "--output_dir", str(out)]) == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    tc, vc = pipe.transformer.config, pipe.vae.config
    assert tc.qk_norm == "rms_norm" and tuple(tc.dual_attention_layers) == (0,) and tc.num_layers == 3
    assert tc.in_channels == 16 and tc.patch_size == 2 and tc.joint_attention_dim == pipe.text_encoder_3.config.d_model
    assert vc.latent_channels == 16 and vc.scaling_factor == 1.5305 and vc.shift_factor == 0.0609
    assert tc.pooled_projection_dim == (pipe.text_encoder.config.projection_dim
                                        + pipe.text_encoder_2.config.projection_dim)
    js = tmp_path / "time.json"
    assert probe_main([
        "--what", "time", "--reps", "1", "--json", str(js), "--config", "configs/sd35m_flow_grpo.yaml",
        "--pretrained_model_name_or_path", str(out), "--prompts", "scenes:train", "--eval_sets", "eval",
        "--reward", "jpeg_compressibility", "--prompts_per_step", "1", "--group_size", "2", "--sample_batch_size", "2",
        "--resolution", "32", "--mixed_precision", "no", "--max_sequence_length", "8",
    ]) == 0
    res = json.loads(js.read_text())
    # 10 steps x 2 samples x CFG 2 in sampling; 9 trained steps x 2 x CFG 2 x (policy + KL reference) in training.
    # The group shares its initial noise: the first step's 4 rows (and those of its policy and reference passes in
    # training) are 2 distinct ones, which the transformer sees once
    assert res["trainer_nfe_sampling"] == 40 and res["bare_nfe_sampling"] == 38
    assert res["trainer_nfe_training"] == 72 and res["bare_nfe_training"] == 68
    assert res["workload"]["transformer_input_shapes"] == [[2, 16, 4, 4], [4, 16, 4, 4]]
    assert res["overhead_ratio"] > 0 and res["iteration_s"] > 0


def test_suite_default_runs_every_algorithm_preset():
    """The suite's default preset list covers every preset of flowrl.presets: each sampling preset by name and each
    objective-only preset (GRPO-Guard) composed onto Flow-GRPO, as in its paper."""
    from benchmarks.suite import DEFAULT_PRESETS
    from flowrl.presets import PRESETS

    named = {part for p in DEFAULT_PRESETS for part in p.split("+")}
    assert set(PRESETS) <= named, set(PRESETS) - named
    assert DEFAULT_PRESETS[0] == "flow_grpo" and "flow_grpo+grpo_guard" in DEFAULT_PRESETS
