"""Evaluation metrics of §7.4, computed on the test splits.

Exact-fact accuracy (QA): a greedy answer is correct when it states the gold fact verbatim
(case-insensitive, whole words) — the automatic stand-in for "factually accurate responses" (§7.1).
"""
import re


def states_fact(answer: str, fact: str) -> bool:
    """True when `fact` appears in `answer` as whole words, ignoring case."""
    return re.search(rf"(?<!\w){re.escape(fact.lower())}(?!\w)", answer.lower()) is not None


def fact_accuracy(answers: list[str], records: list[dict]) -> float:
    """Share of QA answers that state their record's gold fact."""
    return sum(states_fact(a, r["fact"]) for a, r in zip(answers, records, strict=True)) / len(records)
