"""The README's "Security in brief" table states the bounds the code enforces, figure by figure."""

from __future__ import annotations

import re
from pathlib import Path

import digit_budget
import digit_contract
import digit_explanations
import digit_kserve
import digit_oip
from digits.serving.http11 import Limits

README = Path(__file__).resolve().parents[2] / "README.md"


def security_rows() -> dict[str, tuple[str, str]]:
    """The table of the README's "Security in brief" section: first cell -> (bound, past it)."""
    section = README.read_text().split("## Security in brief", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| what")]
    cells = [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]
    return {first: (bound, past) for first, bound, past in cells}


def numbers(text: str) -> list[int]:
    return [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", text)]


def row_starting(prefix: str) -> tuple[str, str]:
    rows = security_rows()
    found = [row for first, row in rows.items() if first.startswith(prefix)]
    assert len(found) == 1, f"one README security row starting {prefix!r}, found {sorted(rows)}"
    return found[0]


def test_the_decoding_budget_is_the_handler_s():
    bound, past = row_starting("pixels to decode")
    assert numbers(bound)[0] == digit_budget.REQUEST_BOUNDS["pixels"] == digit_budget.MAX_PIXELS
    assert numbers(bound)[1:] == [digit_budget.MAX_IMAGE_SIDE] * 2
    assert "TooMuchDecodingWork" in past


def test_the_digit_and_explanation_counts_are_the_handler_s():
    assert numbers(row_starting("digits in one OIP")[0]) == [digit_oip.MAX_DIGITS] == [digit_kserve.MAX_INSTANCES]
    assert numbers(row_starting("digits explained")[0]) == [digit_explanations.MAX_EXPLAINED]


def test_the_answer_limit_is_torchserve_s_default_as_the_contract_has_it():
    bound, past = row_starting("bytes of the answer")
    assert numbers(bound)[0] == digit_contract.TORCHSERVE_MAX_RESPONSE
    assert "AnswerTooLarge" in past


def test_the_page_server_s_limits_are_its_defaults():
    bound, _ = row_starting("the drawing page")
    limits = Limits()
    assert numbers(bound) == [limits.connections, int(limits.head_s), int(limits.body_s)]
