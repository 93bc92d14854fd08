"""Branching samplers (samplers.branching) and their training (flowrl.branching_trainer): NFE accounting against the
closed forms, one shared forward per node = separate forwards, exact replay in training, advantage backup on a
hand-built tree, G²RPO granularity schedules by hand, config errors, and each preset trained through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from flowrl.advantages import backup_advantages, group_advantages
from flowrl.cli import build_config, main
from flowrl.config import ConfigError
from flowrl.seeding import gaussian
from flowrl.trainer import Trainer, make_plan
from samplers.branching import (
    G2RPOPlan,
    TempFlowPlan,
    TreePlan,
    branch_step,
    continuation_nfe,
    granularity_sigmas,
    ode_continue,
    rescore_rows,
    sample_branching,
    spec_nfe,
)
from samplers.solvers import dpm_solver_2m, euler_ode
from samplers.steps import euler_step, flow_grpo_sde_step
from tests.helpers import save_tiny_sd3

BRANCHING_PRESETS = ("tempflow_grpo", "g2rpo", "dynamic_treerpo")
T = 6
SIGMAS = [1 - i / T for i in range(T + 1)]
SHAPE = (4, 4, 4)


class TinyVelocity(nn.Module):
    """v = conv_a(x) + sigma * conv_b(x) + 0.1 * row: sigma- and conditioning-dependent; counts evaluations."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        self.calls += x.shape[0]
        return self.a(x) + sigma * self.b(x) + 0.1 * rows.float().view(-1, 1, 1, 1)


def noise_fn(keys: list) -> torch.Tensor:
    return torch.stack([gaussian(SHAPE, 7, *k) for k in keys])


def run(plan, roots: int = 2, batch_size: int = 4, solver: str = "euler", model: TinyVelocity | None = None):
    model = model or TinyVelocity()
    x = torch.stack([gaussian(SHAPE, 1, r) for r in range(roots)])
    with torch.no_grad():
        ro = sample_branching(model, x, torch.arange(roots), torch.arange(100, 100 + roots), plan(SIGMAS), noise_fn,
                              batch_size=batch_size, ode_solver=solver)
    return ro, model


# ---------------------------------------------------------------------------------------------------------- NFE
@pytest.mark.parametrize("start", [0, 2])
def test_binary_tree_of_depth_4_has_30_transitions_16_leaves_and_exact_nfe(start):
    roots = 3
    plan = TreePlan(depth=4, branch_factor=2, start=start)
    ro, model = run(plan, roots=roots)
    spec = plan(SIGMAS)
    # per tree: 2 + 4 + 8 + 16 = 30 stored SDE transitions (vs 16 x 4 = 64 for independent trajectories), from
    # 1 + 2 + 4 + 8 = 15 node forwards (one per internal node, shared by its 2 children), 16 leaves
    assert spec.transitions_per_root() == 30 and ro.num_rows == 30 * roots
    assert ro.num_nodes == 15 * roots and ro.num_leaves == 16 * roots == spec.leaves_per_root() * roots
    # NFE per tree = l Euler steps before the window + 15 node forwards + 16 leaves x (T - l - 4) tail steps
    per_root = start + 15 + 16 * (T - start - 4)
    assert ro.nfe == model.calls == roots * per_root == roots * spec_nfe(spec)["total"]
    assert ro.nfe_parts == {"anchor": roots * start, "nodes": roots * 15, "continuations": roots * 16 * (T - start - 4)}
    # levels: 1, 2, 4, 8 nodes per tree at steps l .. l+3, noise eta_t = 0.7 (1 + t / 4)
    for t in range(4):
        at = ro.node_levels == t
        assert int(at.sum()) == roots * 2**t
        assert set(ro.node_steps[at].tolist()) == {start + t}
        assert ro.node_noise_levels[at].tolist() == pytest.approx([0.7 * (1 + t / 4)] * roots * 2**t)
    # prefix sharing: each non-root node is the child of a row of the level above
    inner = ro.node_parent_row >= 0
    assert int(inner.sum()) == roots * 14
    parents = ro.row_node[ro.node_parent_row[inner]]
    assert (ro.node_levels[parents] == ro.node_levels[inner] - 1).all()
    torch.testing.assert_close(ro.next_latents[ro.node_parent_row[inner]], ro.node_latents[inner], rtol=0, atol=0)


def test_tree_flash_tail_counts():
    # window [0, 4) of T = 6, tail m = 2 steps -> max(int(2 * 0.5), 1) = 1 DPM-Solver++ step per leaf
    plan = TreePlan(depth=4, branch_factor=2, flash_ratio=0.5, ode_solver="dpm2m")
    ro, model = run(plan, roots=1, solver="dpm2m")
    assert ro.nfe == model.calls == 15 + 16 * 1


def test_tempflow_nfe_is_the_papers_formula():
    """N (T + K Σ_{j=1}^{T-1} j) per prompt: N seeds, each a main ODE trajectory of T forwards, each forward shared
    with the K children of that step; a child of step i needs T - 1 - i ODE forwards (0 at the last step: the child
    is the image). That is branching at all T steps; by default we skip the last step (like Flow-GRPO's trained
    steps), and the main trajectory stops after its last branch step: N (T - 1 + K Σ_{j=1}^{T-1} j)."""
    N, K = 2, 3
    tri = sum(range(1, T))
    ro, model = run(TempFlowPlan(branch_factor=K, branch_steps=tuple(range(T))), roots=N)
    assert ro.nfe == model.calls == N * (T + K * tri)
    assert ro.num_rows == ro.num_leaves == N * K * T
    ro, model = run(TempFlowPlan(branch_factor=K), roots=N)
    assert ro.nfe == model.calls == N * (T - 1 + K * tri)
    # a subset {1, 3}: main trajectory to step 3 (4 forwards), children need T-2 and T-4 forwards
    plan = TempFlowPlan(branch_factor=K, branch_steps=(1, 3))
    ro, model = run(plan, roots=N)
    assert ro.nfe == model.calls == N * (4 + K * ((T - 2) + (T - 4))) == N * spec_nfe(plan(SIGMAS))["total"]
    assert ro.nfe_parts["anchor"] == N * 2 and ro.nfe_parts["nodes"] == N * 2  # Euler steps 0, 2; nodes at 1, 3


def test_g2rpo_granularity_schedules_by_hand():
    s = [round(1 - i / 10, 10) for i in range(11)]  # 1.0, 0.9, ..., 0.0
    # a child of branch step k = 1 sits at sigmas[2]; member list sigmas[:3] + sigmas[3::g]
    assert granularity_sigmas(s, 1, 1) == tuple(s[2:])
    assert granularity_sigmas(s, 1, 2) == (0.8, 0.7, 0.5, 0.3, 0.1)  # stops above 0: image = x0_hat at 0.3
    assert granularity_sigmas(s, 1, 3) == (0.8, 0.7, 0.4, 0.1)
    assert granularity_sigmas(s, 0, 2) == (0.9, 0.8, 0.6, 0.4, 0.2, 0.0)
    lists = [granularity_sigmas(s, 1, g) for g in (1, 2, 3)]
    # evaluations: g=1 at 0.8 .. 0.1 (8); g=2 adds 0.5, 0.3 (0.8, 0.7 shared); g=3 adds 0.4
    assert continuation_nfe(0.8, lists) == 8 + 2 + 1
    # the image of an early-stopping list is x0_hat at its last evaluated sigma, by hand
    model = TinyVelocity()
    x = gaussian(SHAPE, 3)[None]
    rows = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        got, nfe = ode_continue(model, x, rows, [[lists[1]]])
        y = x
        for a, b in [(0.8, 0.7), (0.7, 0.5), (0.5, 0.3)]:
            y = euler_step(model(y, torch.tensor(a), rows), y, a, b).prev_sample
        expected = y - 0.3 * model(y, torch.tensor(0.3), rows)
    assert nfe == 4
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the plan: M = first half {0, 1, 2} at T = 6, one anchor forward per branch step
    plan = G2RPOPlan(branch_factor=2, granularities=(1, 2, 3))
    spec = plan(SIGMAS)
    assert spec.train_indices == [0, 1, 2]
    assert spec.levels[1].continuations == tuple(granularity_sigmas(SIGMAS, 1, g) for g in (1, 2, 3))
    ro, model = run(plan, roots=2)
    per_child = [continuation_nfe(SIGMAS[k + 1], [granularity_sigmas(SIGMAS, k, g) for g in (1, 2, 3)])
                 for k in range(3)]
    assert per_child == [5 + 1 + 0, 4, 3]  # T=6, k=0: g=1 s1..s5, g=2 adds s4', g=3 (s1, s2, s5) nothing new
    assert ro.nfe == model.calls == 2 * (3 + 2 * sum(per_child))
    assert ro.num_leaves == 2 * 3 * 2 * 3 and sorted(set(ro.leaf_tag.tolist())) == [0, 1, 2]


def test_ode_continue_is_the_solver_and_shares_nothing_across_states():
    model = TinyVelocity()
    x = torch.stack([gaussian(SHAPE, 5, i) for i in range(3)])
    rows = torch.tensor([0, 1, 2])
    with torch.no_grad():
        for solver, ref in (("euler", euler_ode), ("dpm2m", dpm_solver_2m)):
            got, nfe = ode_continue(model, x, rows, [[SIGMAS]] * 3, solver=solver, batch_size=2)
            exp = torch.cat([ref(lambda y, s, i=i: model(y, s, rows[i : i + 1]), x[i : i + 1], SIGMAS)
                             for i in range(3)])
            torch.testing.assert_close(got, exp, rtol=0, atol=1e-6)
            assert nfe == 3 * T
        done, nfe = ode_continue(model, x[:1], rows[:1], [[(0.0,)]])
    assert nfe == 0 and torch.equal(done, x[:1])


# ---------------------------------------------------------------------------------------------------------- shared forward
def test_one_shared_forward_gives_the_log_probs_of_separate_forwards():
    model = TinyVelocity()
    x = torch.stack([gaussian(SHAPE, 9, i) for i in range(2)])
    rows = torch.tensor([0, 1])
    K = 4
    noise = torch.stack([torch.stack([gaussian(SHAPE, 11, i, k) for k in range(K)]) for i in range(2)])
    with torch.no_grad():
        out = branch_step(model(x, torch.tensor(0.5), rows), x, 0.5, 0.4, "sde", 0.7, noise)
        for k in range(K):  # a separate forward and step per child
            sep = flow_grpo_sde_step(model(x, torch.tensor(0.5), rows), x, 0.5, 0.4, 0.7, noise=noise[:, k])
            assert torch.equal(sep.prev_sample, out.children[:, k])
            assert torch.equal(sep.log_prob, out.log_probs[:, k])
            assert torch.equal(sep.mean, out.mean) and torch.equal(sep.std, out.std)
    # a whole tree: replaying the sampling chunks rescoring every row is exact; per-row forwards agree too
    ro, model = run(TreePlan(depth=3, branch_factor=2, start=1), roots=2, batch_size=3)
    with torch.no_grad():
        for nodes in ro.node_batches:
            rows_ = (ro.row_node[:, None] == nodes[None]).any(1).nonzero().flatten()
            v = model(ro.node_latents[nodes], ro.node_sigmas[int(nodes[0])], ro.node_roots[nodes])
            lp, mean, std = rescore_rows(v, ro, nodes, rows_)
            assert torch.equal(lp, ro.log_probs[rows_]) and torch.equal(mean, ro.means[rows_])
        for r in range(0, ro.num_rows, 5):
            n = ro.row_node[r : r + 1]
            v = model(ro.node_latents[n], ro.node_sigmas[n], ro.node_roots[n])
            lp, _, _ = rescore_rows(v, ro, n, torch.tensor([r]))
            torch.testing.assert_close(lp, ro.log_probs[r : r + 1], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------- advantages
def _hand_tree():
    """Binary depth-2 tree: node 0 (root) -rows 0, 1-> nodes 1, 2; node 1 -rows 2, 3-> leaves 0, 1;
    node 2 -rows 4, 5-> leaves 2, 3."""
    row_node = torch.tensor([0, 0, 1, 1, 2, 2])
    node_parent_row = torch.tensor([-1, 0, 1])
    leaf_row = torch.tensor([2, 3, 4, 5])
    return row_node, node_parent_row, leaf_row


def test_advantage_backup_on_a_hand_built_tree():
    row_node, parent, leaf_row = _hand_tree()
    a = torch.tensor([1.0, -0.5, 0.3, -0.8])
    ok = torch.ones(4, dtype=torch.bool)
    adv, valid = backup_advantages(a, ok, leaf_row, row_node, parent)
    assert adv.tolist() == pytest.approx([0.25, -0.25, 1.0, -0.5, 0.3, -0.8]) and valid.all()
    # softmax(log p_old) over a node's children: node 1's rows weigh 1/4, 3/4; node 2's 1/2, 1/2
    lp = torch.tensor([0.0, 0.0, 0.0, math.log(3.0), -1.0, -1.0])
    adv, _ = backup_advantages(a, ok, leaf_row, row_node, parent, row_log_probs=lp, node_rule="softmax")
    assert adv.tolist() == pytest.approx([0.25 - 0.375, -0.25, 1.0, -0.5, 0.3, -0.8])
    # an invalid leaf (NaN reward) is left out of its node's mean
    adv, valid = backup_advantages(a, torch.tensor([True, False, True, True]), leaf_row, row_node, parent)
    assert adv.tolist() == pytest.approx([1.0, -0.25, 1.0, 0.0, 0.3, -0.8])
    assert valid.tolist() == [True, True, True, False, True, True]
    # G²RPO: several leaves per row (one per granularity, each normalised in its own group) are summed
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.0, 5.0, 7.0, 6.0, 7.0])  # rows 0, 0, 1, 1 (g=1), 0, 0, 1, 1 (g=2)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    lr = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    la = group_advantages(rewards, groups).advantages
    adv, _ = backup_advantages(la, torch.ones(8, dtype=torch.bool), lr, torch.tensor([9, 9]), torch.zeros(10).long() - 1)
    assert adv.tolist() == pytest.approx([float(la[0] + la[1] + la[4] + la[5]), float(la[2] + la[3] + la[6] + la[7])])


# ---------------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--algorithm", "tempflow_grpo+grpo_guard"], "mutually exclusive"),
        (["--sft_weight", "0.1"], "needs plan='tree'"),
        (["--dynamic_clip", "true"], "branching plans"),
        (["--branch_update", "step"], "branching plans"),
        (["--algorithm", "dynamic_treerpo", "--tree_depth", "11"], "tree_depth must be in"),
        (["--algorithm", "dynamic_treerpo", "--window_start", "7"], "window_start must be in"),
        (["--algorithm", "dynamic_treerpo", "--clip_range_high", "0.3"], "clip_range_high must be null"),
        (["--algorithm", "g2rpo", "--branch_steps", "0,12"], "branch_steps"),
        (["--algorithm", "g2rpo", "--granularities", "0,1"], "granularities"),
        (["--algorithm", "g2rpo", "--flash_ratio", "0.5"], "flash_ratio must be 1"),
        (["--algorithm", "tempflow_grpo", "--branch_factor", "1"], "branch_factor"),
    ],
)
def test_config_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        build_config(flags)


def test_presets_compose():
    cfg = build_config(["--algorithm", "g2rpo+grpo_guard"])
    assert cfg.plan.plan == "g2rpo" and cfg.grpo.ratio_norm and cfg.grpo.step_weighting == "guard"
    cfg = build_config(["--algorithm", "tempflow_grpo+grpo_guard", "--step_weighting", "tempflow"])
    assert cfg.plan.plan == "tempflow" and cfg.grpo.ratio_norm and cfg.grpo.step_weighting == "tempflow"
    tree = build_config(["--algorithm", "dynamic_treerpo"])
    assert (tree.plan.tree_depth, tree.plan.branch_factor, tree.grpo.dynamic_clip, tree.grpo.beta) == (4, 2, True, 0.0)
    plan = make_plan(tree)
    assert isinstance(plan, TreePlan) and plan.window().schedule == "progressive"


# ---------------------------------------------------------------------------------------------------------- end to end
TINY = ["--prompts_per_step", "2", "--sample_batch_size", "2", "--num_inference_steps", "4", "--report_to", "none",
        "--eval_steps", "0", "--learning_rate", "1e-2", "--clip_range", "0.2", "--rank", "4",
        "--checkpointing_steps", "0"]
SMALL = {
    "tempflow_grpo": ["--group_size", "2", "--branch_factor", "2"],
    "g2rpo": ["--branch_factor", "2", "--granularities", "1,2", "--branch_update", "step"],
    "dynamic_treerpo": ["--tree_depth", "2", "--sft_weight", "0.1"],
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("model") / "tiny-sd3")  # guidance 2.0: CFG doubles the NFE


@pytest.mark.parametrize("name", BRANCHING_PRESETS)
def test_preset_trains_through_the_cli_with_exact_nfe(name, tiny_model, tmp_path):
    out = tmp_path / name
    assert main(["train", "--algorithm", name, "--pretrained_model_name_or_path", str(tiny_model), "--output_dir",
                 str(out), "--max_train_steps", "1", *TINY, *SMALL[name]]) == 0
    (rec,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = build_config(["--algorithm", name, *TINY, *SMALL[name]])
    spec = make_plan(cfg)([1 - i / 4 for i in range(5)], 0)  # counts do not depend on sigma values
    roots = 2 * cfg.grpo.group_size
    per_root = {"tempflow_grpo": 3 + 2 * 6,  # T - 1 + K Σ_{j=1}^{3} j
                "g2rpo": 2 + 2 * (3 + 2),  # 2 anchor forwards; k=0: g1 s1..s3, g2 (s1, s2, s4) shared; k=1: 2
                "dynamic_treerpo": 0 + 3 + 4 * 2}[name]  # l=0, 1 + 2 node forwards, 4 leaves x 2 tail steps
    assert spec_nfe(spec)["total"] == per_root
    assert rec["nfe/sampling"] == roots * per_root * 2  # x2: CFG
    nodes = roots * sum(spec.nodes_per_root())
    # x2: CFG in training; the SFT term adds one conditional forward per pulled node (dynamic_treerpo)
    assert rec["branch/nodes"] == nodes and rec["nfe/training"] == nodes * 2 + rec.get("train/sft_forwards", 0)
    assert rec["branch/transitions"] == roots * spec.transitions_per_root()
    steps = sorted(int(k.rsplit("step", 1)[1]) for k in rec if k.startswith("train/ratio_mean/step"))
    assert steps == spec.train_indices
    first = spec.train_indices[0]
    assert rec[f"train/ratio_mean/step{first}"] == 1.0  # the first update's rows are exactly on-policy
    if name == "g2rpo":
        assert rec["train/optimizer_updates"] == 2  # one per branch step
    else:
        assert rec["train/ratio_min"] == 1.0 == rec["train/ratio_max"]
        assert rec["train/optimizer_updates"] == 1
    if name == "tempflow_grpo":
        w = [rec[f"train/step_weight/step{k}"] for k in steps]
        assert sum(w) / len(w) == pytest.approx(1.0) and w[0] > w[-1]  # noise-aware: s_i / mean_j s_j
    if name == "dynamic_treerpo":
        assert "train/sft_loss" in rec and 0.1 <= rec["train/dynamic_clip_mean"] <= 0.4
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("name", ["g2rpo", "dynamic_treerpo"])
def test_grpo_guard_composes_with_branching_plans(name, tiny_model, tmp_path):
    """PLAN+grpo_guard trains through the CLI: the clipped ratio is GRPO-Guard's normalised one (mean 1 at every
    branch step, raw ratio logged beside it), and the step weights are the guard's (mean 1, not all equal)."""
    out = tmp_path / name
    assert main(["train", "--algorithm", f"{name}+grpo_guard", "--pretrained_model_name_or_path", str(tiny_model),
                 "--output_dir", str(out), "--max_train_steps", "2", *TINY, *SMALL[name]]) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for rec in recs:
        steps = sorted(int(k.rsplit("step", 1)[1]) for k in rec if k.startswith("train/ratio_mean/step"))
        assert steps and all(f"train/raw_ratio_mean/step{k}" in rec for k in steps)
        for k in steps:
            assert rec[f"train/ratio_mean/step{k}"] == pytest.approx(1.0, abs=1e-3)
        w = [rec[f"train/step_weight/step{k}"] for k in steps]
        assert sum(w) / len(w) == pytest.approx(1.0, rel=1e-5)
        if len(w) > 1:
            assert max(w) > min(w)  # 1/dt of a non-uniform schedule
        assert rec["train/loss"] == rec["train/loss"]
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_tempflow_advantage_groups(tiny_model, tmp_path):
    cfg = build_config(["--algorithm", "tempflow_grpo", "--pretrained_model_name_or_path", str(tiny_model),
                        "--output_dir", str(tmp_path / "t"), "--branch_factor", "3", *TINY, "--group_size", "2",
                        "--reward", "jpeg_incompressibility"])
    tr = Trainer(cfg)
    tr.setup()
    for grouping in ("seed", "prompt"):
        tr.cfg.plan.tempflow_grouping = grouping
        batch, _ = tr.sample_and_score(1)
        ro = batch.rollout
        a = batch.leaf_advantages.double()
        root, level = ro.leaf_roots, ro.leaf_levels
        prompt = root // 2
        assert float(a.abs().max()) > 0.1  # the reward varies
        for p in range(2):
            for lv in range(3):
                assert abs(float(a[(prompt == p) & (level == lv)].sum())) < 1e-4  # centred per (prompt, step)
                if grouping == "seed":  # ... and per seed: the K siblings of one main trajectory
                    for r in (2 * p, 2 * p + 1):
                        assert abs(float(a[(root == r) & (level == lv)].sum())) < 1e-4
        torch.testing.assert_close(batch.row_advantages, batch.leaf_advantages.clamp(-5, 5))  # one leaf per row


def test_sft_regresses_the_conditional_velocity_not_the_cfg_mix(tiny_model, tmp_path):
    """With CFG, the LayerTuning term fits v_cond(x_t) to v* through one extra conditional forward per pulled node
    (regressing the guided mix collapsed the embedded model); the forwards are counted and the loss is by hand."""
    import dataclasses

    from flowrl import branching_trainer

    cfg = build_config(["--algorithm", "dynamic_treerpo", "--pretrained_model_name_or_path", str(tiny_model),
                        "--output_dir", str(tmp_path / "s"), "--max_train_steps", "1", *TINY,
                        *SMALL["dynamic_treerpo"]])
    tr = Trainer(cfg)
    tr.setup()
    assert tr.guidance != 1.0 and cfg.sampling.train_cfg
    batch, _ = tr.sample_and_score(1)
    ro = batch.rollout
    target = torch.randn_like(ro.node_latents)
    batch = dataclasses.replace(batch, node_sft_weight=torch.ones(ro.num_nodes), node_sft_target=target)
    with torch.no_grad():  # the expected term at the current weights, all nodes pulled with weight 1
        cond = batch.cond_all.select(batch.root_rows[ro.node_roots])
        expected = 0.0
        for n in range(ro.num_nodes):
            v_c = tr.policy.velocity(ro.node_latents[n : n + 1], ro.node_sigmas[n], cond.select(torch.tensor([n])), 1.0)
            expected += float((v_c - target[n : n + 1]).square().mean())
        expected *= cfg.grpo.sft_weight / batch.n_trees
    calls = []
    real = tr.policy.velocity

    def spy(x, sigma, cond, guidance_scale=1.0):
        calls.append((x.shape[0], guidance_scale))
        return real(x, sigma, cond, guidance_scale)

    tr.policy.velocity = spy
    out = branching_trainer.update(tr, batch)
    assert out["sft_forwards"] == ro.num_nodes
    assert sum(b for b, g in calls if g == 1.0) == ro.num_nodes  # conditional passes: the SFT's
    assert sum(b for b, g in calls if g == tr.guidance) == ro.num_nodes  # guided passes: the policy gradient's
    assert out["sft_loss"] == pytest.approx(expected, rel=1e-4)


def test_best_path_sft_targets():
    from flowrl.branching_trainer import _best_path_targets

    ro, _ = run(TreePlan(depth=2, branch_factor=2), roots=1)
    scores = {"r": torch.tensor([0.1, 0.9, 0.3, 0.2])}
    ok = torch.ones(4, dtype=torch.bool)
    la = group_advantages(scores["r"], torch.zeros(4, dtype=torch.long)).advantages
    ra, rv = backup_advantages(la, ok, ro.leaf_row, ro.row_node, ro.node_parent_row)
    w, target = _best_path_targets(ro, scores, {"r": None}, {"r": 1.0}, ok, ra, rv)
    best_row = int(ro.leaf_row[1])
    n1 = int(ro.row_node[best_row])  # level-1 node above the best leaf
    root_row = int(ro.node_parent_row[n1])
    assert w[n1] == pytest.approx(float(la[1])) and w[0] == pytest.approx(float((la[0] + la[1]) / 2))
    assert float(w.sum()) == pytest.approx(float(w[n1] + w[0])) and root_row in (0, 1)
    for n in (0, n1):
        torch.testing.assert_close(target[n], (ro.node_latents[n] - ro.leaves[1]) / ro.node_sigmas[n])
