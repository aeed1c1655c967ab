"""The reasoning-gym tasks a run can train on, with their generator settings: the one table that
RunConfig validates `data.tasks` against and server_sdk/data.py generates examples from."""

from __future__ import annotations

from typing import Any

# Tasks a 135M model can learn in a few hundred steps, with small generator settings
# (short prompts and answers, so seq_len 128 holds them). Name -> reasoning-gym kwargs.
TASKS: dict[str, dict[str, Any]] = {
    "chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
    "basic_arithmetic": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1},
    "spell_backward": {"min_word_len": 3, "max_word_len": 6},
    "word_sequence_reversal": {"min_words": 3, "max_words": 4},
    "letter_counting": {"min_words": 3, "max_words": 5},
    "count_bits": {"max_n": 255},
    "gcd": {"min_numbers": 2, "max_numbers": 2, "min_value": 2, "max_value": 60},
}
TASK_NAMES = frozenset(TASKS)
