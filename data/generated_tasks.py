"""An embedded instruction set whose answers can be checked exactly: no download, no judge.

``generate_tasks(n)`` makes records of eight kinds (arithmetic, unit conversion, sorting, ...),
each with one right answer, so a fine-tuning run can be scored by exact match.
"""

import random

WORDS = (
    "apple", "banana", "river", "planet", "garden", "window", "purple", "rocket", "silver", "forest",
    "pencil", "mirror", "castle", "dragon", "bottle", "candle", "butter", "winter", "summer", "letter",
    "orange", "monkey", "button", "ladder", "marble", "pepper", "rabbit", "saddle", "tunnel", "violin",
    "yellow", "zipper", "anchor", "basket", "cotton", "desert", "engine", "falcon", "guitar", "harbor",
)

# (from, to, how many "to" in one "from"): exact integer factors only, so answers are exact.
CONVERSIONS = (
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("kg", "g", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
)


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b, operator = rng.randint(0, 99), rng.randint(0, 99), rng.choice("+-*")
    if operator == "*":
        b = rng.randint(0, 12)  # times tables: multiplication a small model can learn
    result = a + b if operator == "+" else a - b if operator == "-" else a * b
    return "Calculate the result.", f"{a} {operator} {b}", str(result)


def _unit_conversion(rng: random.Random) -> tuple[str, str, str]:
    source, target, factor = rng.choice(CONVERSIONS)
    amount = rng.randint(1, 20)
    return f"Convert {amount} {source} to {target}. Answer with the number only.", "", str(amount * factor)


def _sort(rng: random.Random) -> tuple[str, str, str]:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    return "Sort the numbers in ascending order.", ", ".join(map(str, numbers)), ", ".join(map(str, sorted(numbers)))


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return "Reverse the letters of the word.", word, word[::-1]


def _count_letter(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")  # sometimes 0
    return f"How many times does the letter '{letter}' appear in the word?", word, str(word.count(letter))


def _uppercase(rng: random.Random) -> tuple[str, str, str]:
    text = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
    return "Write the text in capital letters.", text, text.upper()


def _larger(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(1000), 2)  # two different numbers, so there is one answer
    return f"Which is larger, {a} or {b}? Answer with the number only.", "", str(max(a, b))


def _next_number(rng: random.Random) -> tuple[str, str, str]:
    start, step, length = rng.randint(0, 50), rng.randint(1, 12), rng.randint(3, 5)
    sequence = [start + step * i for i in range(length)]
    return "What number comes next in the sequence?", ", ".join(map(str, sequence)), str(start + step * length)


# Two kinds (unit_conversion, larger) put everything in the instruction and leave input
# empty, so both branches of the template are trained and tested.
TASKS = {
    "arithmetic": _arithmetic,
    "unit_conversion": _unit_conversion,
    "sort": _sort,
    "reverse": _reverse,
    "count_letter": _count_letter,
    "uppercase": _uppercase,
    "larger": _larger,
    "next_number": _next_number,
}
TASK_KINDS = tuple(TASKS)


def generate_tasks(n: int, seed: int = 0) -> list[dict]:
    """``n`` instruction records with exact answers, the kinds taken in turn; the same for the same seed.

    Each record has ``instruction``, ``input``, ``output`` (the answer as a string) and
    ``kind`` (one of ``TASK_KINDS``). Taking the kinds in turn makes their counts differ by at
    most one. Every character is printable ASCII, so the character-level tokenizer of the tiny
    models covers them.

    Raises:
        ValueError: ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"n must be a non-negative number of tasks, got {n}")
    rng = random.Random(seed)
    records = []
    for i in range(n):
        kind = TASK_KINDS[i % len(TASK_KINDS)]
        instruction, input_, output = TASKS[kind](rng)
        records.append({"instruction": instruction, "input": input_, "output": output, "kind": kind})
    return records
