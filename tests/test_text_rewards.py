"""Text rewards: TRL's signature, built-ins, their own registry, the arithmetic task and its held-out split."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

import rewards
from rewards import RewardError, available_rewards, get_text_reward, score_text
from rewards.text import arithmetic_problems, exact_answer, extract_answer


@pytest.mark.parametrize("text, expected", [
    ("19", "19"),
    ("12 + 7 = 19.", "19"),
    ("The answer is #### 42 and then 7", "42"),
    ("#### 1,234", "1234"),
    ("-3", "-3"),
    ("no number", None),
    ("#### none", None),
    ("pi is 3.14", "3.14"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_exact_answer_trl_signature():
    out = exact_answer(["1+1=", "2+2=", "3+3=", "4+4="], ["2", "so 12 + 7 = 19", "x", "8"],
                       answer=["2", "19.0", "6", None], trainer_state=object())
    assert out == [1.0, 1.0, 0.0, None]
    assert exact_answer(["a"], ["1"]) == [None]  # no answer column: not applicable


def test_format_reward_factory():
    fmt = get_text_reward("format")
    assert fmt(["p"] * 3, [" 12 ", "12 apples", "-4"]) == [1.0, 0.0, 1.0]
    tagged = get_text_reward("format", pattern=r"<answer>\d+</answer>")
    assert tagged(["p", "p"], ["<answer>3</answer>", "3"]) == [1.0, 0.0]


def test_text_registry_is_separate_from_image_registry():
    assert {"exact_answer", "format"} <= set(rewards.available_text_rewards())
    assert not {"exact_answer", "format"} & set(available_rewards())
    with pytest.raises(ValueError, match="unknown text reward"):
        get_text_reward("scenes")


def test_trl_style_function_by_module_attr(monkeypatch):
    mod = types.ModuleType("my_trl_rewards")

    def length_reward(completions, **kwargs):  # TRL reward functions often take completions by keyword
        return [float(len(c)) for c in completions]

    def trl_positional(prompts, completions, **kwargs):
        return [None if p == "skip" else 1.0 for p in prompts]

    mod.length_reward, mod.trl_positional = length_reward, trl_positional
    monkeypatch.setitem(sys.modules, "my_trl_rewards", mod)
    f = get_text_reward("my_trl_rewards:trl_positional")
    s = score_text(f, ["a", "skip"], ["x", "y"], name="trl_positional", answer=["1", "2"])
    assert s.dtype == torch.float32 and s[0] == 1.0 and math.isnan(float(s[1]))
    s = score_text(get_text_reward("my_trl_rewards:length_reward"), ["a", "b"], ["xyz", ""], name="len")
    assert s.tolist() == [3.0, 0.0]
    with pytest.raises(ValueError):
        get_text_reward("my_trl_rewards:missing")


def test_score_text_names_the_bad_reward():
    with pytest.raises(RewardError, match="'short'"):
        score_text(lambda prompts, completions, **k: [1.0], ["a", "b"], ["x", "y"], name="short")
    with pytest.raises(RewardError, match="'boom'.*ZeroDivisionError"):
        score_text(lambda prompts, completions, **k: [1 / 0], ["a"], ["x"], name="boom")
    with pytest.raises(RewardError, match="index 1"):
        score_text(lambda prompts, completions, **k: [1.0, "2"], ["a", "b"], ["x", "y"], name="bad")


def test_arithmetic_split_is_disjoint_fixed_and_exact():
    train = arithmetic_problems("train", max_operand=9, ops="+-")
    held = arithmetic_problems("heldout", max_operand=9, ops="+-")
    all_ = arithmetic_problems("all", max_operand=9, ops="+-")
    assert not {p.question for p in train} & {p.question for p in held}
    assert len(train) + len(held) == len(all_) == 100 + 55  # subtraction keeps a >= b
    assert 0.1 < len(held) / len(all_) < 0.3
    assert held == arithmetic_problems("heldout", max_operand=9, ops="+-")  # deterministic
    for p in all_:
        a, op, b = p.question[:-1].partition("+") if "+" in p.question else p.question[:-1].partition("-")
        assert int(p.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    with pytest.raises(ValueError):
        arithmetic_problems("test")
    with pytest.raises(ValueError):
        arithmetic_problems(ops="/")
