"""What the trade-off table's cost figures are made of: latency ratios with their spread and
the figures that cannot be true flagged; a training's own peak memory on a CPU."""

import torch

from peft_core.profile import MemoryTracker, half_iqr, latency_flags


def test_half_iqr_is_the_plus_minus_of_a_median():
    assert half_iqr([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]) == (6.75 - 2.25) / 2
    assert half_iqr([1.0, 1.5]) == 0.25  # too few for quartiles: half the range


def test_an_adapter_faster_than_its_base_beyond_the_spread_is_flagged():
    assert latency_flags({"overhead": 1.04, "overhead_spread": 0.02}) == []
    assert latency_flags({"overhead": 0.97, "overhead_spread": 0.05}) == []  # within spread
    (flag,) = latency_flags({"overhead": 0.63, "overhead_spread": 0.05})
    assert "faster than the base (0.63× ± 0.05)" in flag and "cannot be" in flag


def test_a_merged_model_is_the_base_architecture_so_a_difference_is_flagged():
    same = {"overhead": 1.2, "overhead_spread": 0.1}
    assert latency_flags(same | {"merged_overhead": 1.01, "merged_spread": 0.0}) == []
    assert latency_flags(same | {"merged_overhead": 1.1, "merged_spread": 0.09}) == []
    (flag,) = latency_flags(same | {"merged_overhead": 1.26, "merged_spread": 0.05})
    assert "1.26× the base" in flag and "base model's architecture" in flag
    (noisy,) = latency_flags(same | {"latency_spread": 0.4})
    assert "spread by 40%" in noisy


def test_the_cpu_peak_is_the_training_s_own_even_in_a_long_lived_process():
    """The RSS of a process that already freed memory does not grow when a later training
    reuses it (the "<0.1 MiB" of a long-lived worker); the allocator's count sees each."""
    for _ in range(2):
        tracker = MemoryTracker("cpu")
        assert tracker.kind == "heap"
        block = torch.ones(25_000_000)  # 95.4 MiB
        tracker.sample()
        del block
        peak = tracker.peak_mb()
        assert 90 < peak < 150, peak


def test_sample_answers_take_the_base_side_given_with_its_evaluation():
    """The base's answers kept with the base evaluation are not generated again; answers
    generated as one batch are each prompt's own answer."""
    from peft_core import LoraConfig, apply
    from peft_core.catalogue import load_model
    from peft_core.profile import greedy_answer, sample_generations

    model, tokenizer = load_model("tiny-llama", "causal-lm")
    apply(model, LoraConfig(r=2))
    rows = [{"prompt": "Reverse: abc", "completion": "cba"}, {"prompt": "Add 2 and 3"}]
    given = sample_generations(model, tokenizer, rows, max_new_tokens=4, base_answers=["x", "y"])
    assert [s["base"] for s in given] == ["x", "y"]
    fresh = sample_generations(model, tokenizer, rows, max_new_tokens=4)
    alone = [greedy_answer(model, tokenizer, row["prompt"], max_new_tokens=4) for row in rows]
    assert [s["adapter"] for s in fresh] == [s["adapter"] for s in given] == alone


def _trained(method: str, config: dict):
    """tiny-llama with a `method` adapter whose weights moved, as after training (a fresh
    LoRA's B is zero: merged or not, it would compute the base)."""
    from peft_core import apply, build_config
    from peft_core.catalogue import load_model

    model, tokenizer = load_model("tiny-llama", "causal-lm")
    model = apply(model, build_config(method, config, tokenizer=tokenizer))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def test_the_merged_switch_runs_the_merged_model_and_leaves_the_weights_as_they_were():
    """The latency rounds merge once and switch between merged and unmerged without moving a
    weight: each side computes the adapter's outputs, the merged side from the merged weights
    alone (zeroing the adapter's parameters changes the unmerged side only), and after the
    block every weight is the tensor it was, bit for bit."""
    from peft_core.profile import _merged_switch

    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]])}
    for method, config in (("lora", {"r": 4}), ("dora", {"r": 4}), ("ia3", {})):
        model = _trained(method, config)
        before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            adapted = model(**batch).logits
            with _merged_switch(model) as use:
                for is_merged in (True, False, True, True, False):
                    use(is_merged)
                    torch.testing.assert_close(model(**batch).logits, adapted)
                kept = [p.clone() for p in trainable]
                for param in trainable:
                    param.zero_()
                use(True)
                torch.testing.assert_close(model(**batch).logits, adapted)
                use(False)
                assert not torch.allclose(model(**batch).logits, adapted, atol=1e-3), method
                for param, value in zip(trainable, kept, strict=True):
                    param.copy_(value)
            assert torch.equal(model(**batch).logits, adapted)
        for name, param in model.named_parameters():
            same, values = before[name]
            assert param is same and torch.equal(param, values), (method, name)


def test_the_latency_batch_of_a_causal_lm_keeps_the_last_position_s_logits():
    """A causal LM is timed as generation's prefill runs it: the vocabulary projected for
    the last position only; a classifier takes its batch as it is."""
    from peft_core.catalogue import load_model
    from peft_core.profile import prefill_batch

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    causal, _ = load_model("tiny-llama", "causal-lm")
    batch = prefill_batch(causal, ids)
    assert batch["logits_to_keep"] == 1
    with torch.no_grad():
        last = causal(**batch).logits
        every = causal(input_ids=ids).logits
    assert last.shape == (1, 1, every.shape[-1])
    torch.testing.assert_close(last[0, 0], every[0, -1])
    classifier, _ = load_model("tiny-llama", "seq-cls")
    assert set(prefill_batch(classifier, ids)) == {"input_ids", "attention_mask"}


def test_sample_answers_are_bounded_by_the_expected_answers_plus_a_margin():
    from peft_core.catalogue import load_model
    from peft_core.profile import ANSWER_MARGIN, answer_budget

    _, tokenizer = load_model("tiny-llama", "causal-lm")
    rows = [{"prompt": "p", "completion": "87"}, {"prompt": "q", "completion": "a b c d e f"}]
    longest = len(tokenizer("a b c d e f", add_special_tokens=False)["input_ids"])
    assert answer_budget(tokenizer, rows, cap=64) == longest + ANSWER_MARGIN
    assert answer_budget(tokenizer, rows, cap=3) == 3  # never beyond the cap
    unknown = rows + [{"text": "a row without an expected answer"}]
    assert answer_budget(tokenizer, unknown, cap=24) == 24
