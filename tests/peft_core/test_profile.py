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
