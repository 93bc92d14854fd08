"""FSDP and DeepSpeed code paths of the trainers (flowrl.trainer: unwrap_prepared and the helpers around it).

Which module the policy calls, who reduces the gradients, how the trained weights are gathered and exported, and how
DeepSpeed's engine is stepped are decided by accelerate's ``distributed_type``; the unit tests below check each
branch with stand-ins for the accelerator (DeepSpeed is not installed here, and accelerate 1.15 selects FSDP only on
accelerator devices: with ``ACCELERATE_USE_CPU=1`` an FSDP config silently runs as MULTI_CPU DDP).

The slow test runs the real image trainer under torch FSDP (FULL_SHARD, use_orig_params, gloo) on 2 CPU processes:
accelerate is launched with configs/accelerate/fsdp.yaml (minus the two keys that need a GPU) through a small runner
that lets accelerate's state take its FSDP branch on CPU, and the final LoRA must match one process with the same
global batch. It does not resume: on CPU/gloo torch's FSDP1 ``optim_state_dict`` returns Adam's ``exp_avg_sq`` in
place of ``exp_avg`` (reproduced with plain torch, no accelerate or flowrl), so an FSDP checkpoint's optimizer
state is wrong there and a resumed run cannot match; FSDP resume is unverified until it runs on GPUs.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import yaml

from flowrl.cli import build_config
from flowrl.config import ConfigError
from flowrl.trainer import (
    Prepared,
    backward,
    clip_parameters,
    configure_for_wrapper,
    deepspeed_step,
    finite_everywhere,
    save_peft_lora,
    trainable_state_dict,
    unwrap_prepared,
)

ROOT = Path(__file__).resolve().parents[1]


class FakeGradientState:
    def __init__(self) -> None:
        self.sync_gradients = True

    def _set_sync_gradients(self, v: bool) -> None:
        self.sync_gradients = v


class FakeAccelerator:
    """The parts of ``accelerate.Accelerator`` the helpers use."""

    def __init__(self, distributed_type: str = "NO", main: bool = True, full_state: dict | None = None, **state):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType(distributed_type)
        self.is_main_process = main
        self.gradient_state = FakeGradientState()
        self.state = types.SimpleNamespace(**state)
        self.backward_calls: list[tuple[float, bool]] = []  # (loss value, sync_gradients at the call)
        self.state_dict_calls = 0
        self._full = full_state or {}

    def unwrap_model(self, m):
        while hasattr(m, "module"):
            m = m.module
        return m

    def backward(self, loss):
        self.backward_calls.append((float(loss.detach()), self.gradient_state.sync_gradients))
        loss.backward()

    def get_state_dict(self, model):
        self.state_dict_calls += 1
        return dict(self._full)


class Wrapper(torch.nn.Module):
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def _ddp(module: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel:
    """A DistributedDataParallel instance without a process group (only its type and ``.module`` matter here)."""
    d = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    torch.nn.Module.__init__(d)
    d.module = module
    return d


def _cfg(*flags: str):
    return build_config(["--rank", "4", "--sample_batch_size", "2", "--prompts_per_step", "2", "--group_size", "2",
                         "--max_grad_norm", "0.5", *flags])


# ------------------------------------------------------------------------------------------------ which path
@pytest.mark.parametrize(
    ("dtype", "wrap", "kind", "policy_gets", "average", "collective"),
    [
        ("NO", None, "single", "model", False, False),
        ("MULTI_CPU", _ddp, "ddp", "bare", True, False),
        ("MULTI_GPU", _ddp, "ddp", "bare", True, False),
        ("FSDP", Wrapper, "fsdp", "wrapper", False, True),
        ("DEEPSPEED", Wrapper, "deepspeed", "bare", False, True),
    ],
)
def test_unwrap_prepared_picks_the_policy_module_and_who_reduces(dtype, wrap, kind, policy_gets, average, collective):
    bare = torch.nn.Linear(2, 2)
    model = bare if wrap is None else wrap(bare)
    p = unwrap_prepared(FakeAccelerator(dtype), model, ["weight"])
    assert p.kind == kind
    assert p.bare is bare and p.wrapper is model
    assert p.module is {"model": model, "bare": bare, "wrapper": model}[policy_gets]
    assert p.average_grads is average  # only DDP: FSDP / DeepSpeed reduce in backward, never twice
    assert p.collective_backward is collective


# ------------------------------------------------------------------------------------------------ before prepare
def test_configure_for_fsdp_checks_and_holds_the_transformer_in_fp32():
    ok = types.SimpleNamespace(fsdp_version=1, use_orig_params=True)
    module = torch.nn.Linear(2, 2).to(torch.bfloat16)
    configure_for_wrapper(FakeAccelerator("FSDP", fsdp_plugin=ok), _cfg(), module)
    assert module.weight.dtype == torch.float32  # FSDP1 flattens one dtype per unit (LoRA is fp32)

    with pytest.raises(ConfigError, match="fsdp_use_orig_params: true"):
        configure_for_wrapper(FakeAccelerator("FSDP", fsdp_plugin=types.SimpleNamespace(fsdp_version=1,
                                                                                          use_orig_params=False)),
                              _cfg(), module)
    configure_for_wrapper(FakeAccelerator("FSDP", fsdp_plugin=types.SimpleNamespace(fsdp_version=2,
                                                                                      use_orig_params=False)),
                          _cfg(), module)  # FSDP2 shards parameters one by one: no such requirement
    with pytest.raises(ConfigError, match=r"LoRA only \(--rank > 0\)"):
        configure_for_wrapper(FakeAccelerator("FSDP", fsdp_plugin=ok), _cfg("--rank", "0"), module)
    with pytest.raises(ConfigError, match="not supported by the text trainer"):
        configure_for_wrapper(FakeAccelerator("FSDP", fsdp_plugin=ok), _cfg(), module, text=True)


def test_configure_for_deepspeed_fills_batch_clipping_and_rejects_zero3():
    ds = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": "auto",
          "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 1.0}
    plugin = types.SimpleNamespace(deepspeed_config=ds)
    configure_for_wrapper(FakeAccelerator("DEEPSPEED", deepspeed_plugin=plugin), _cfg(), torch.nn.Linear(2, 2))
    assert ds["train_micro_batch_size_per_gpu"] == 2  # no dataloader: sample_batch_size
    assert ds["gradient_clipping"] == 0.5  # the engine clips, at --max_grad_norm
    assert ds["gradient_accumulation_steps"] == 1
    with pytest.raises(ConfigError, match="'tempflow' is not wired for DeepSpeed"):
        configure_for_wrapper(FakeAccelerator("DEEPSPEED", deepspeed_plugin=plugin), _cfg("--plan", "tempflow"),
                              torch.nn.Linear(2, 2), branching=True)
    for bad, match in (({"zero_optimization": {"stage": 3}}, "ZeRO stage 3"),
                       ({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4},
                        "gradient_accumulation_steps must be 1")):
        with pytest.raises(ConfigError, match=match):
            configure_for_wrapper(FakeAccelerator("DEEPSPEED", deepspeed_plugin=types.SimpleNamespace(
                deepspeed_config=bad)), _cfg(), torch.nn.Linear(2, 2))


def test_configure_is_a_no_op_for_ddp_and_one_process():
    module = torch.nn.Linear(2, 2).to(torch.bfloat16)
    for dtype in ("NO", "MULTI_CPU", "MULTI_GPU"):
        configure_for_wrapper(FakeAccelerator(dtype), _cfg(), module)
    assert module.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ backward / step
def test_deepspeed_backwards_accumulate_and_one_boundary_step_ends_the_update():
    w = torch.nn.Parameter(torch.ones(3))
    acc = FakeAccelerator("DEEPSPEED")
    ds = Prepared("deepspeed", None, None, None, [])
    backward(acc, ds, (2 * w).sum())
    backward(acc, ds, (3 * w).sum())
    deepspeed_step(acc, [w])
    # the update's losses are not boundaries (no engine step); the zero-valued one is, and adds nothing
    assert acc.backward_calls == [(6.0, False), (9.0, False), (0.0, True)]
    assert torch.equal(w.grad, torch.full((3,), 5.0))
    assert acc.gradient_state.sync_gradients is True  # restored for the scheduler's step

    acc = FakeAccelerator("MULTI_GPU")
    backward(acc, Prepared("ddp", None, None, None, []), (2 * w).sum())
    assert acc.backward_calls == [(6.0, True)]  # untouched elsewhere


def test_clip_parameters_under_fsdp_are_the_roots():
    root = Wrapper(torch.nn.Linear(2, 2))
    lora = [root.module.weight]
    assert clip_parameters(Prepared("ddp", root.module, root.module, root, []), lora) is lora
    # accelerate calls the FSDP root's clip_grad_norm_ (norm over all shards) only when handed exactly its parameters
    got = [p for p in clip_parameters(Prepared("fsdp", root, root.module, root, []), lora)]
    assert got == [p for p in root.parameters()]


def test_non_finite_loss_is_skipped_on_every_process_when_backward_communicates(monkeypatch):
    import torch.distributed as dist

    assert finite_everywhere(torch.tensor(1.0), Prepared("ddp", None, None, None, []))
    assert not finite_everywhere(torch.tensor(float("nan")), Prepared("single", None, None, None, []))
    seen = []

    def other_rank_has_nan(t, op=None):  # MIN over processes, another one non-finite
        seen.append(op)
        t.zero_()

    monkeypatch.setattr(dist, "all_reduce", other_rank_has_nan)
    assert not finite_everywhere(torch.tensor(1.0), Prepared("fsdp", None, None, None, []))
    assert not finite_everywhere(torch.tensor(1.0), Prepared("deepspeed", None, None, None, []))
    assert seen == [dist.ReduceOp.MIN] * 2
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: None)
    assert finite_everywhere(torch.tensor(1.0), Prepared("fsdp", None, None, None, []))


# ------------------------------------------------------------------------------------------------ state dicts / export
def test_trainable_state_dict_gathers_under_fsdp_on_every_process():
    full = {"a.lora_A.default.weight": torch.ones(2), "a.base_layer.weight": torch.zeros(2)}
    names = ["a.lora_A.default.weight"]
    fsdp = Prepared("fsdp", None, None, object(), names)
    main, other = FakeAccelerator("FSDP", full_state=full), FakeAccelerator("FSDP", main=False, full_state=full)
    assert list(trainable_state_dict(main, fsdp, lambda: pytest.fail("local read under FSDP"))) == names
    assert trainable_state_dict(other, fsdp, lambda: pytest.fail("local read under FSDP")) is None
    assert main.state_dict_calls == other.state_dict_calls == 1  # a collective: every process takes part
    local = {"x": torch.ones(1)}
    ddp = Prepared("ddp", None, None, None, ["x"])
    assert trainable_state_dict(FakeAccelerator("MULTI_GPU"), ddp, lambda: local) is local
    assert trainable_state_dict(FakeAccelerator("MULTI_GPU", main=False), ddp, lambda: pytest.fail("read")) is None


def test_save_peft_lora_from_a_gathered_state_dict_equals_the_policys_export(tmp_path):
    from safetensors import safe_open

    from flowrl.policies import load_policy
    from tests.helpers import save_tiny_sd3

    model = save_tiny_sd3(tmp_path / "tiny")
    pol = load_policy(str(model), lora_rank=4, lora_alpha=8.0, lora_targets=["to_q", "to_k", "to_v", "to_out.0"],
                      max_sequence_length=4, weight_dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(torch.randn_like(p))  # lora_B starts at 0: make the export non-trivial
    pol.save_lora(tmp_path / "policy")
    gathered = {k: v.clone() for k, v in pol.trainable_state_dict().items()}  # clean names, as FSDP gathers them
    blocks = pol.transformer.transformer_blocks
    for i, block in enumerate(blocks):  # nest each block as FSDP's auto-wrap does: names gain "_fsdp_wrapped_module."
        unit = torch.nn.Module()
        unit._fsdp_wrapped_module = block
        blocks[i] = unit
    assert any("._fsdp_wrapped_module." in n for n, _ in pol.transformer.named_parameters())
    save_peft_lora(pol, pol.transformer, gathered, tmp_path / "gathered")
    files = [tmp_path / d / "pytorch_lora_weights.safetensors" for d in ("policy", "gathered")]
    (a, b) = [safe_open(str(f), "pt") for f in files]
    assert a.metadata() == b.metadata() and a.keys() == b.keys() and len(a.keys()) > 0
    assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


# ------------------------------------------------------------------------------------------------ torch FSDP on CPU
FSDP_RUNNER = textwrap.dedent(
    '''
    """Run ``flowrl`` with accelerate's FSDP branch on CPU (test only).

    accelerate 1.15 turns ACCELERATE_USE_FSDP into DistributedType.FSDP only for accelerator devices; with
    ACCELERATE_USE_CPU=1 it stays MULTI_CPU and ignores the plugin. torch FSDP itself runs on CPU with gloo
    (device_id=cpu), so the state is switched to FSDP after accelerate initialised it, and its device from "cpu:0"
    (MULTI_CPU's) to "cpu", which FSDP compares with the CPU's current device.
    """
    import sys

    import accelerate.state as st
    import torch
    from accelerate.utils import DistributedType

    _init = st.AcceleratorState.__init__


    def init(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            for state in (self, st.PartialState()):
                state.distributed_type = DistributedType.FSDP
                state.device = torch.device("cpu")
            self.fsdp_plugin = plugin


    st.AcceleratorState.__init__ = init
    from flowrl.cli import main

    sys.exit(main(sys.argv[1:]))
    '''
)


def _fsdp_cpu_config(path: Path) -> Path:
    """configs/accelerate/fsdp.yaml for 2 CPU processes: sync_module_states and cpu_ram_efficient_loading need a GPU
    (accelerate asks for the current CUDA/XPU/... device); every process builds the same model here anyway."""
    cfg = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text())
    cfg.update(num_processes=2, use_cpu=True, distributed_type="FSDP")
    cfg["fsdp_config"].update(fsdp_sync_module_states=False, fsdp_cpu_ram_efficient_loading=False)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    from tests.helpers import free_port, run_train, save_tiny_sd3, subprocess_env
    from tests.test_multiprocess import ARGS

    model = save_tiny_sd3(tmp_path / "tiny-sd3")
    runner = tmp_path / "fsdp_cpu_runner.py"
    runner.write_text(FSDP_RUNNER)
    common = ["--pretrained_model_name_or_path", str(model), *ARGS, "--checkpointing_steps", "1"]
    config = _fsdp_cpu_config(tmp_path / "fsdp_cpu.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
           str(free_port()), str(runner), "train", *common, "--prompts_per_step", "2",
           "--output_dir", str(tmp_path / "fsdp")]
    two = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-4000:]
    one = run_train([*common, "--prompts_per_step", "4", "--output_dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-4000:]

    out = tmp_path / "fsdp"
    ck = out / "checkpoint-2"
    assert (ck / "pytorch_model_fsdp.bin").is_file(), "accelerate did not take its FSDP path"
    assert (ck / "ema-rank0.safetensors").is_file() and (ck / "ema-rank1.safetensors").is_file()
    sd = load_file(str(ck / "trainable.safetensors"))  # gathered: whole tensors, un-prefixed names
    assert sd and not any("_fsdp_wrapped_module" in k for k in sd) and all(v.dim() == 2 for v in sd.values())
    a = load_file(str(tmp_path / "one" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-4
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |dLoRA| 1 process vs FSDP on 2: {diff:.3g}")
    assert diff <= 1e-5 and not math.isnan(diff)
    m1, m2 = (_records(d) for d in (tmp_path / "one", out))
    assert [r["step"] for r in m2] == [1, 2]
    for r1, r2 in zip(m1, m2):  # grad_norm: clipped on the FSDP root, over every shard
        for key in ("reward/mean", "train/grad_norm", "train/lr"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-5, abs=1e-9), key


def _records(out: Path) -> list[dict]:
    import json

    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
