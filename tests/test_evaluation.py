import pytest

from backattn.evaluation import answers_match, final_answer_accuracy, parse_final_answer, parse_number


@pytest.mark.parametrize(
    "text, number",
    [("72", 72.0), ("1,234", 1234.0), ("$5.50", 5.5), ("-3", -3.0), ("3/4", 0.75), ("12.", 12.0), ("0.5", 0.5),
     ("abc", None), ("", None), (None, None), ("1/0", None)],
)  # fmt: skip
def test_parse_number(text, number):
    assert parse_number(text) == number


@pytest.mark.parametrize(
    "solution, answer",
    [
        ("She sold 48 + 24 = 72 clips.\nThe final answer is 72.", "72"),
        ("The final answer is $1,250.", "1,250"),
        ("The final answer is -7", "-7"),
        ("The final answer is 3/4.", "3/4"),
        ("First 10, then 20, so 30 in all", "30"),
        ("no numbers at all", None),
    ],
)
def test_parse_final_answer(solution, answer):
    assert parse_final_answer(solution) == answer


def test_answers_match_numbers_as_numbers():
    assert answers_match("1,000.0", "1000") and answers_match("$5.50", "5.5") and answers_match("3/4", "0.75")
    assert not answers_match("71", "72") and not answers_match(None, "72") and not answers_match("-3", "3")
    assert answers_match("Yes", "yes")


def test_final_answer_accuracy():
    solutions = ["The final answer is 72.", "The final answer is 10.", "I do not know"]
    assert final_answer_accuracy(solutions, ["72", "11", "3"]) == pytest.approx(1 / 3)
