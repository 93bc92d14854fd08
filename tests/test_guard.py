"""GRPO-Guard regulated clipping (arXiv 2510.22319): the normalised ratio on real rollouts, its statistics under
small policy changes, the step reweighting factors by hand, config errors, and the ``grpo_guard`` preset trained
through the CLI with every plan preset (first, on-policy pass exactly 1; per-step diagnostics logged)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from flowrl.cli import build_config, main
from flowrl.config import ConfigError
from flowrl.objectives import guard_normalized_log_ratio, step_weights
from flowrl.trainer import Trainer, make_plan
from samplers.plans import FullSDEPlan
from samplers.rollout import rescore, sample
from samplers.steps import dmean_dv
from tests.helpers import save_tiny_sd3

T = 10
SIGMAS = [1 - i / T for i in range(T + 1)]


class TinyVelocity(nn.Module):
    """v = conv_a(x) + sigma * conv_b(x): a few hundred parameters, sigma-dependent."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.a(x) + sigma * self.b(x)


def _rollout_and_perturbed(kind: str, noise_level: float, batch: int, scale: float):
    """A rollout of a tiny velocity model (noise recorded per step) and a copy with N(0, scale²) parameter noise."""
    torch.manual_seed(0)
    model = TinyVelocity()
    g = torch.Generator().manual_seed(1)
    noises: dict[int, torch.Tensor] = {}

    def noise_fn(j: int) -> torch.Tensor:
        noises[j] = torch.randn(batch, 4, 8, 8, generator=g)
        return noises[j]

    plan = FullSDEPlan(kind, noise_level, 0.9)(SIGMAS)
    with torch.no_grad():
        r = sample(model, torch.randn(batch, 4, 8, 8, generator=g), plan, noise_fn)
    pert = TinyVelocity()
    pert.load_state_dict(model.state_dict())
    gp = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in pert.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gp))
    return r, pert, noises


@pytest.mark.parametrize("kind, noise_level", [("sde", 0.7), ("dance", 0.3)])
def test_normalized_log_ratio_on_a_real_rollout_is_mean_eps_times_mean_shift(kind, noise_level):
    r, pert, noises = _rollout_and_perturbed(kind, noise_level, batch=8, scale=0.05)
    assert r.latents.shape[1] == 9
    for j in range(9):
        with torch.no_grad():
            log_prob, mean, std = rescore(pert(r.latents[:, j], r.sigmas[j]), r, j)
        got = guard_normalized_log_ratio(log_prob, r.log_probs[:, j], mean, r.means[:, j], std)
        eps = noises[int(r.step_indices[j])]
        expected = (eps * (mean - r.means[:, j])).mean(dim=(1, 2, 3))
        assert float(expected.abs().max()) > 1e-4  # the perturbation is visible above float32 noise
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-3)
        # the stored sample really is mean_old + s * eps, and the on-policy value is exactly 0
        torch.testing.assert_close(r.next_latents[:, j], r.means[:, j] + std.reshape(-1, 1, 1, 1) * eps)
        on = guard_normalized_log_ratio(r.log_probs[:, j], r.log_probs[:, j], r.means[:, j], r.means[:, j], std)
        assert (on == 0).all()


@pytest.mark.parametrize("kind, noise_level", [("sde", 0.7), ("dance", 0.3)])
def test_normalized_ratio_is_centred_at_every_step_while_raw_ratio_is_left_shifted(kind, noise_level):
    """E[raw r] = exp(-(1 - 1/N) mean(d²)/(2s²)) < 1 (d = mean shift, N elements); E[r̂] = exp(mean(d²)/(2N)) ≈ 1."""
    B = 512
    r, pert, _ = _rollout_and_perturbed(kind, noise_level, batch=B, scale=0.05)
    for j in range(r.latents.shape[1]):
        with torch.no_grad():
            log_prob, mean, std = rescore(pert(r.latents[:, j], r.sigmas[j]), r, j)
        raw = torch.exp(log_prob - r.log_probs[:, j]).double()
        norm = torch.exp(guard_normalized_log_ratio(log_prob, r.log_probs[:, j], mean, r.means[:, j], std)).double()
        se_raw, se_norm = float(raw.std()) / math.sqrt(B), float(norm.std()) / math.sqrt(B)
        shift_raw, dev_norm = 1 - float(raw.mean()), float(norm.mean()) - 1
        assert shift_raw > 5 * se_raw, (j, shift_raw, se_raw)  # raw ratio significantly below 1
        assert abs(dev_norm) < 4 * se_norm, (j, dev_norm, se_norm)  # normalised ratio: mean 1 within noise
        assert abs(dev_norm) < 0.1 * shift_raw, (j, dev_norm, shift_raw)
        # the raw shift is the predicted one: mean over samples of mean(d²)/(2 s²)
        pred = float(((mean - r.means[:, j]).square().mean(dim=(1, 2, 3)) / (2 * std**2)).mean())
        assert -float((log_prob - r.log_probs[:, j]).mean()) == pytest.approx(pred, rel=0.15)


def test_guard_step_factors_by_hand():
    # sigma 0.5 -> 0.4 (dt 0.1) for each step kind
    sde = 0.1 * (1 + 0.7**2 * 0.5 / (2 * 0.5) * 1.0)  # sigma_t = 0.7 sqrt(0.5/0.5) = 0.7: dt (1 + st²(1-s)/(2s))
    dance = 0.1 * (1 + 0.3**2 * 0.5 / (2 * 0.5))
    sc = 0.4 * math.sin(0.8 * math.pi / 2)
    cps = abs(-(1 - 0.4) * 0.5 + math.sqrt(0.4**2 - sc**2) * (1 - 0.5))
    assert (sde, dance) == pytest.approx((0.1245, 0.1045))
    for kind, nl, d in (("sde", 0.7, sde), ("dance", 0.3, dance), ("cps", 0.8, cps)):
        assert float(dmean_dv(kind, 0.5, 0.4, nl)) == pytest.approx(d, rel=1e-6)
    w = step_weights("guard", ("sde", "dance", "cps"), torch.tensor([0.5] * 3), torch.tensor([0.4] * 3),
                     (0.7, 0.3, 0.8), torch.ones(3))
    inv = [1 / sde, 1 / dance, 1 / cps]
    assert w.tolist() == pytest.approx([u / (sum(inv) / 3) for u in inv], rel=1e-6)
    assert float(w.mean()) == pytest.approx(1.0)
    # a Flow-GRPO plan on a uniform schedule: at sigma = 1 the factor is dt (1 - sigma = 0), elsewhere
    # dt (1 + a²/2) since sigma_t² (1 - sigma) / (2 sigma) = a² / 2
    plan = FullSDEPlan("sde", 0.7, 0.9)(SIGMAS)
    tr = [s for s in plan.steps if s.train]
    w = step_weights("guard", [s.kind for s in tr], torch.tensor([s.sigma for s in tr]),
                     torch.tensor([s.sigma_next for s in tr]), [s.noise_level for s in tr], torch.ones(len(tr)))
    inv = [1 / 0.1] + [1 / (0.1 * (1 + 0.49 / 2))] * 8
    assert w.tolist() == pytest.approx([u / (sum(inv) / 9) for u in inv], rel=1e-5)


def test_tempflow_and_uniform_weights():
    w = step_weights("tempflow", ("sde",) * 3, torch.zeros(3), torch.zeros(3), (0.7,) * 3,
                     torch.tensor([0.1, 0.2, 0.3]))
    assert w.tolist() == pytest.approx([0.5, 1.0, 1.5])
    assert step_weights("uniform", ("sde",), torch.ones(1), torch.zeros(1), (0.7,), torch.ones(1)) is None
    with pytest.raises(ValueError, match="one value per trained step"):
        step_weights("tempflow", ("sde",) * 2, torch.zeros(2), torch.zeros(2), (0.7,) * 2, torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        step_weights("tempflow", ("sde",) * 2, torch.zeros(2), torch.zeros(2), (0.7,) * 2, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--step_weighting", "guard,tempflow"], "mutually exclusive"),
        (["--step_weighting", "guard+tempflow"], "mutually exclusive"),
        (["--step_weighting", "dt"], "step_weighting"),
        (["--algorithm", "flow_grpo_cps+grpo_guard"], "ratio_norm .*cps"),
        (["--step_kind", "cps", "--ratio_norm", "true"], "variance-free"),
        (["--algorithm", "mixgrpo+nope"], "'nope'"),
    ],
)
def test_config_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        build_config(flags)


def test_guard_parts_compose_with_plan_presets():
    by_flags = build_config(["--algorithm", "mixgrpo", "--ratio_norm", "true", "--step_weighting", "guard"])
    assert by_flags.plan.plan == "window" and by_flags.grpo.ratio_norm and by_flags.grpo.step_weighting == "guard"
    cfg = build_config(["--algorithm", "mixgrpo_flash+grpo_guard"])
    assert (cfg.plan.plan, cfg.plan.ode_solver, cfg.sampling.same_noise_per_group) == ("window", "dpm2m", True)
    g = cfg.grpo
    assert (g.ratio_norm, g.step_weighting, g.clip_range, g.beta) == (True, "guard", 2e-6, 0.0)
    assert cfg.optim.gradient_accumulation_steps == 1
    assert build_config(["--algorithm", "grpo_guard+flow_grpo"]).plan.train_fraction == 0.9  # order-free here
    tf = build_config(["--algorithm", "dance_grpo", "--step_weighting", "tempflow", "--step_kind", "cps"]).grpo
    assert tf.step_weighting == "tempflow" and not tf.ratio_norm  # CPS with weights alone is fine


# ------------------------------------------------------------------------------------------------------ end to end
TINY = [
    "--prompts_per_step", "2", "--group_size", "2", "--sample_batch_size", "2", "--num_inference_steps", "6",
    "--report_to", "none", "--eval_steps", "0", "--learning_rate", "1e-2", "--rank", "4", "--checkpointing_steps", "0",
    "--same_noise_per_group", "false", "--ode_after_train", "false",  # the Flow-GRPO sampling these checks assume
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("model") / "tiny-sd3")


@pytest.mark.parametrize("plan_preset", ["flow_grpo", "mixgrpo", "mixgrpo_flash", "dance_grpo"])
def test_grpo_guard_trains_with_every_plan_preset(plan_preset, tiny_model, tmp_path, monkeypatch):
    calls: list[tuple[int, dict]] = []
    inner = Trainer.micro_batch_loss

    def spy(self, *args, **kwargs):
        stats = inner(self, *args, **kwargs)
        calls.append((self.step, stats))
        return stats

    monkeypatch.setattr(Trainer, "micro_batch_loss", spy)
    out = tmp_path / plan_preset
    algorithm = f"{plan_preset}+grpo_guard"
    assert main(["train", "--algorithm", algorithm, "--pretrained_model_name_or_path", str(tiny_model),
                 "--output_dir", str(out), "--max_train_steps", "2", *TINY]) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    cfg = build_config(["--algorithm", algorithm, *TINY])
    assert cfg.grpo.ratio_norm and cfg.grpo.step_weighting == "guard" and cfg.grpo.clip_range == 2e-6
    for step in (1, 2):
        plan = make_plan(cfg)([1 - i / 6 for i in range(7)], step - 1)
        first = next(s for st, s in calls if st == step)  # the first micro-batch: sampled by the current policy
        assert len([1 for st, _ in calls if st == step]) == 2  # two micro-batches, one update each
        for k in plan.train_indices:
            # on-policy: every sample's normalised ratio is exactly 1
            assert first[f"ratio_mean/step{k}"] == 1.0 and first[f"_d1/step{k}"] == 0.0 == first[f"_d2/step{k}"]
        rec = recs[step - 1]
        assert rec["train/optimizer_updates"] == 2
        keys = ("ratio_mean", "ratio_std", "raw_ratio_mean", "clipfrac_pos", "clipfrac_neg", "grad_norm",
                "grad_share", "step_weight")
        for name in keys:
            got = sorted(int(k.rsplit("step", 1)[1]) for k in rec if k.startswith(f"train/{name}/step"))
            assert got == plan.train_indices, (name, got)
        assert not any(k.startswith("train/_") for k in rec)
        if rec["train/zero_std_share"] < 1:  # some group has a reward spread: there are gradients
            assert sum(rec[f"train/grad_share/step{k}"] for k in plan.train_indices) == pytest.approx(1.0)
            assert all(rec[f"train/grad_norm/step{k}"] > 0 for k in plan.train_indices)
        else:  # all advantages 0: no gradient, shares 0 by convention
            assert all(rec[f"train/grad_norm/step{k}"] == 0 for k in plan.train_indices)
        # GRPO-Guard weights of the trained steps, normalised to mean 1 (values: test_guard_step_factors_by_hand)
        w = [rec[f"train/step_weight/step{k}"] for k in plan.train_indices]
        assert sum(w) / len(w) == pytest.approx(1.0, rel=1e-6)
    assert min(r["train/zero_std_share"] for r in recs) < 1  # the run did train


def test_step_weights_in_the_trainer_match_the_rollout(tiny_model, tmp_path):
    """The weights the trainer logs are step_weights() of the iteration's trained steps, and scale the loss."""
    cfg = build_config(["--algorithm", "flow_grpo", "--pretrained_model_name_or_path", str(tiny_model),
                        "--output_dir", str(tmp_path / "w"), "--max_train_steps", "1", "--step_weighting", "tempflow",
                        *TINY])
    trainer = Trainer(cfg)
    trainer.setup()
    batch, _ = trainer.sample_and_score(1)
    r = batch.rollouts[0]
    expected = step_weights("tempflow", r.kinds, r.sigmas, r.sigmas_next, r.noise_levels, r.stds.mean(0))
    stats = trainer.micro_batch_loss(r, trainer._conds[0], batch.advantages[:2], batch.valid[:2], scale=1.0)
    got = [stats[f"step_weight/step{int(k)}"] for k in r.step_indices]
    assert got == pytest.approx(expected.tolist())
    assert expected.tolist() == pytest.approx((r.stds[0] / r.stds[0].mean()).tolist(), rel=1e-5)
    assert max(got) / min(got) > 1.5  # noise-aware weights do differ across steps


def test_equal_proxy_gain_interpolation():
    from benchmarks.guard_study import at_proxy_gain

    curve = [{"proxy": -1.0, "gold": 0.5}, {"proxy": -0.8, "gold": 0.4}, {"proxy": -0.6, "gold": 0.2}]
    assert at_proxy_gain(curve, 0.3, "gold") == pytest.approx(0.3)  # halfway between the 2nd and 3rd points
    assert at_proxy_gain(curve, 0.0, "gold") == pytest.approx(0.5)
    assert math.isnan(at_proxy_gain(curve, 0.5, "gold"))  # never reached


@pytest.mark.slow
def test_guard_study_runs_in_parallel_pieces_and_reuse_summarises_them(tmp_path, monkeypatch):
    """Each (method, seed) can run as its own process into the same --out; a last --reuse call trains nothing and
    summarises them all (table, JSON and plot), identical to what the pieces recorded."""
    import benchmarks.common as common
    from benchmarks.guard_study import main as study_main

    model = save_tiny_sd3(tmp_path / "tiny-sd3")
    out = tmp_path / "study"
    flags = ["--steps", "1", "--out", str(out), "--model", str(model), "--eval_every", "1",
             "--prompts_per_step", "2", "--group_size", "2", "--sample_batch_size", "4", "--rank", "4",
             "--num_inference_steps", "3", "--eval_images_per_prompt", "1"]
    assert study_main([*flags, "--methods", "flow_grpo", "--seeds", "0"]) == 0
    assert study_main([*flags, "--methods", "flow_grpo+grpo_guard", "--seeds", "0"]) == 0
    piece = json.loads((out / "flow_grpo" / "seed0" / "run_record.json").read_text())
    assert "--algorithm" in piece["key"]["argv"] and piece["wall_s"] > 0

    def no_training(*a, **k):
        raise AssertionError("--reuse trained a finished run again")

    monkeypatch.setattr(common, "train_run", no_training)
    assert study_main([*flags, "--methods", "flow_grpo,flow_grpo+grpo_guard", "--seeds", "0", "--reuse"]) == 0
    res = json.loads((out / "guard_study.json").read_text())
    assert set(res["methods"]) == {"flow_grpo", "flow_grpo+grpo_guard"}
    assert res["methods"]["flow_grpo"]["0"]["wall_s"] == piece["wall_s"]
    for m in res["methods"]:
        assert len(res["curves"][m]["0"]) == 2  # step 0 and step 1 evaluations
    assert "flow_grpo+grpo_guard" in (out / "guard_study.md").read_text()
    assert (out / "guard_study.png").stat().st_size > 1000
    assert not list(out.glob(".*tmp*"))
    # a changed flag is a different run: --reuse does not pick up the old one
    with pytest.raises(AssertionError, match="trained a finished run again"):
        study_main([*flags, "--methods", "flow_grpo", "--seeds", "0", "--reuse", "--learning_rate", "2e-4"])
