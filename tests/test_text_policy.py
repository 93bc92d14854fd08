"""The causal-LM policy: left padding + position ids, EOS masking, truncation, dropout off, reference, sampling."""

from __future__ import annotations

import copy

import pytest
import torch

from flowrl.policies.text import (
    TextPolicy,
    TextRollout,
    build_char_tokenizer,
    build_tiny_lm,
    completion_mask,
    position_ids_from_mask,
    sample_next_token,
    token_log_probs,
)
from flowrl.text_objectives import text_policy_loss


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def tiny_policy(tok, arch: str = "llama", **kwargs) -> TextPolicy:
    if arch == "gpt2":  # learned absolute position embeddings: left padding breaks it without position ids
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
        return TextPolicy(model, tok, **kwargs)
    return TextPolicy(build_tiny_lm(tok, hidden_size=32, num_layers=2, num_heads=2, seed=0), tok, **kwargs)


PROMPTS = ["1+1=", "12+13=", "7*8=", "123+4="]  # different lengths -> left padding


def test_position_ids_from_mask():
    m = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert position_ids_from_mask(m).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]


def test_completion_mask_first_eos_and_truncation():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9], [5, 6, 7, 2]])
    mask, truncated = completion_mask(ids, [2])
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False], [True] * 4]
    assert truncated.tolist() == [False, True, False, False]
    mask2, _ = completion_mask(ids, [2, 9])  # several EOS ids
    assert mask2[1].tolist() == [True] * 4 and mask2[2].tolist() == [True, False, False, False]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_log_probs_equal_unpadded_single_sequences(tok, arch):
    pol = tiny_policy(tok, arch)
    g = torch.Generator().manual_seed(0)
    r = pol.generate(PROMPTS, max_new_tokens=6, temperature=1.0, generator=g)
    assert r.prompt_mask.shape[1] == max(len(p) for p in PROMPTS)
    assert not r.prompt_mask.all()  # there is padding to test
    logp, _ = pol.log_probs(r)
    for b, prompt in enumerate(PROMPTS):
        n = int(r.mask[b].sum())
        p_ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([p_ids, r.completion_ids[b : b + 1, :n]], 1)
        with torch.no_grad():
            logits = pol.model(input_ids=ids).logits[0, -n - 1 : -1]  # no mask, positions 0..T-1
        single = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, -n:, None]).squeeze(-1)
        torch.testing.assert_close(logp[b, :n].detach(), single, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r.log_probs[b, :n], single, rtol=1e-5, atol=1e-5)


def test_position_ids_matter_under_left_padding(tok):
    """Sanity check of the test above: with naive positions 0..T-1 (pads counted) a padded row's log-probs change
    for absolute position embeddings (GPT-2). (RoPE models such as Llama only see relative positions, so a uniform
    shift leaves them unchanged; the cumsum position ids are right for both.)"""
    pol = tiny_policy(tok, "gpt2")
    r = pol.generate(PROMPTS, max_new_tokens=4, temperature=1.0, generator=torch.Generator().manual_seed(1))
    ids, attn = r.input_ids()
    L = r.completion_ids.shape[1]
    with torch.no_grad():
        right, _ = token_log_probs(pol.model, ids, attn, L)
        naive = torch.arange(ids.shape[1])[None].expand_as(ids)
        out = pol.model(input_ids=ids, attention_mask=attn, position_ids=naive)
        wrong = torch.log_softmax(out.logits[:, -L - 1 : -1].float(), -1)
        wrong = wrong.gather(-1, ids[:, -L:, None]).squeeze(-1)
    padded_row = int((~r.prompt_mask).sum(1).argmax())
    m = r.mask[padded_row]
    assert (right[padded_row][m] - wrong[padded_row][m]).abs().max() > 1e-4


def test_generate_masks_after_eos_and_flags_truncation(tok):
    pol = tiny_policy(tok)
    r = pol.generate(PROMPTS * 8, max_new_tokens=3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    eos = tok.eos_token_id
    for b in range(r.batch_size):
        row, m = r.completion_ids[b], r.mask[b]
        has_eos = bool((row == eos).any())
        assert bool(r.truncated[b]) == (not has_eos)
        if has_eos:
            first = int((row == eos).int().argmax())
            assert m.tolist() == [t <= first for t in range(len(row))]
            assert (row[first + 1 :] == tok.pad_token_id).all()
        else:
            assert m.all()
        assert (r.log_probs[b][~m] == 0).all()
        assert eos not in tok(r.completions[b], add_special_tokens=False)["input_ids"]
    assert r.truncated.any() and (~r.truncated).any()  # a random tiny model does both


def test_on_policy_ratio_exactly_one_and_dropout_off(tok):
    model = build_tiny_lm(tok, hidden_size=32, num_layers=2, num_heads=2)
    model.config.attention_dropout = 0.5  # would randomise every forward in train mode
    pol = TextPolicy(model, tok)
    r = pol.generate(PROMPTS, max_new_tokens=5, temperature=0.8, generator=torch.Generator().manual_seed(0))
    logp, _ = pol.log_probs(r, temperature=0.8)  # with grad
    assert logp.requires_grad and not pol.model.training
    assert torch.equal(logp.detach().masked_fill(~r.mask, 0.0), r.log_probs)
    _, st = text_policy_loss(logp, r.log_probs, torch.randn(len(PROMPTS)), r.mask, loss_type="grpo")
    assert float(st["ratio_min"]) == 1.0 and float(st["ratio_max"]) == 1.0


def test_lora_reference_is_adapter_disabled(tok):
    base = build_tiny_lm(tok, hidden_size=32, num_layers=2, num_heads=2)
    frozen = copy.deepcopy(base)
    pol = TextPolicy(base, tok, lora_rank=4, lora_targets=["q_proj", "v_proj"])
    assert pol.trainable_parameters() and all("lora" in k for k in pol.trainable_state_dict())
    r = pol.generate(PROMPTS, max_new_tokens=4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n, p in pol.model.named_parameters():
            if "lora_B" in n:
                p.normal_()
        moved, _ = pol.log_probs(r)
        with pol.reference():
            ref, _ = pol.log_probs(r)
        ids, attn = r.input_ids()
        expected, _ = token_log_probs(frozen, ids, attn, r.completion_ids.shape[1])
    torch.testing.assert_close(ref, expected)
    assert (moved - ref)[r.mask].abs().max() > 1e-3


def test_full_finetune_reference_is_frozen_copy(tok):
    pol = tiny_policy(tok, need_reference=True)
    r = pol.generate(PROMPTS, max_new_tokens=4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, _ = pol.log_probs(r)
        for p in pol.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        after, _ = pol.log_probs(r)
        with pol.reference():
            ref, _ = pol.log_probs(r)
    torch.testing.assert_close(ref, before)
    assert (after - before)[r.mask].abs().max() > 1e-3
    with pytest.raises(RuntimeError):
        with tiny_policy(tok).reference():
            pass


def test_sample_next_token_top_p_and_greedy():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(400, 3)
    g = torch.Generator().manual_seed(0)
    s = sample_next_token(logits, 1.0, 0.6, g)  # nucleus {0, 1}: 0.5 < 0.6, 0.8 >= 0.6
    assert set(s.tolist()) == {0, 1}
    s = sample_next_token(logits, 1.0, 0.5, g)  # 0.5 already reaches 0.5
    assert set(s.tolist()) == {0}
    s = sample_next_token(logits, 1.0, 1.0, g)
    assert set(s.tolist()) == {0, 1, 2}
    assert sample_next_token(torch.tensor([[0.1, 3.0, 0.2]]), 0.0, 1.0, None).tolist() == [1]


def test_rollout_select_and_cat_repad(tok):
    pol = tiny_policy(tok)
    g = torch.Generator().manual_seed(0)
    a = pol.generate(PROMPTS[:2], max_new_tokens=3, temperature=1.0, generator=g)
    b = pol.generate(PROMPTS[2:], max_new_tokens=5, temperature=1.0, generator=g)
    c = TextRollout.cat([a, b])
    assert c.batch_size == 4 and c.prompts == PROMPTS
    assert c.completions == a.completions + b.completions
    logp, _ = pol.log_probs(c)
    torch.testing.assert_close(logp.detach().masked_fill(~c.mask, 0), c.log_probs, rtol=1e-5, atol=1e-5)
    s = c.select(torch.tensor([3, 0]))
    assert s.prompts == [PROMPTS[3], PROMPTS[0]]
    assert s.prompt_mask.any(0).all()  # no all-pad prompt column left
    assert s.mask.any(0)[-1]  # no all-masked completion column at the end
    torch.testing.assert_close(pol.log_probs(s)[0].detach().masked_fill(~s.mask, 0), s.log_probs,
                               rtol=1e-5, atol=1e-5)


def test_char_tokenizer_round_trip(tok):
    ids = tok("12+7=", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "12+7="
    assert tok.padding_side == "left"
