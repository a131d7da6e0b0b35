"""The synthetic harmony task the built-in model is trained on (python -m gptoss_jax.builtin):
records in the training-file format of gptoss_jax.dataset, drawn from a seeded generator.

Every answer is an analysis-channel message followed by a final-channel message, under the
system message the command-line programs render (reasoning effort low, medium or high), half
of them with a current date as the server renders it:

- addition and subtraction of whole numbers from 0 to 99 (subtraction: the first at least
  the second), worked out digit by digit in the analysis ("2 3 + 1 9: 3+9=12, carry 1;
  2+1+1=4. Answer 42.") and stated in the final answer ("23 + 19 = 42");
- unit conversions of 1 to 99 units (km to m, m to cm, kg to g, cm to mm, l to ml);
- dates a few days after a day of a month (within the month), and the days in a month;
- the weather in a city through a tool call: with the `get_weather` function among the
  developer message's tools, the assistant calls it on the commentary channel with
  {"city": ...}, the tool answers with JSON, and the final answer reports it;
- any other question: the final answer says what the model can answer.
"""

from __future__ import annotations

import datetime
import json
import random

from gptoss_jax import chat_format, dataset
from gptoss_jax.tokenizer import get_tokenizer

REASONING_EFFORTS = ("low", "medium", "high")
FIRST_DATE, LAST_DATE = datetime.date(2024, 1, 1), datetime.date(2035, 12, 31)
KINDS = ("add", "subtract", "convert", "date", "month_days", "weather", "other")
# Draw probabilities of the kinds: the digit-by-digit arithmetic needs the most examples.
WEIGHTS = (0.36, 0.22, 0.1, 0.08, 0.03, 0.13, 0.08)

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Gets the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]},
}
CITIES = ("Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Oslo", "Dublin", "Cairo",
          "Lima", "Sydney", "Toronto", "Chicago", "Boston", "Seattle", "Denver", "Mumbai", "Delhi", "Seoul", "Beijing",
          "Moscow", "Athens", "Prague", "Warsaw", "Zurich", "Miami", "Dallas", "Nairobi")
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "clear")
MONTHS = (("January", 31), ("February", 28), ("March", 31), ("April", 30), ("May", 31), ("June", 30), ("July", 31),
          ("August", 31), ("September", 30), ("October", 31), ("November", 30), ("December", 31))
UNITS = (("km", "m", "kilometers", "meters", 1000), ("m", "cm", "meters", "centimeters", 100),
         ("kg", "g", "kilograms", "grams", 1000), ("cm", "mm", "centimeters", "millimeters", 10),
         ("l", "ml", "liters", "milliliters", 1000))
OTHER_QUESTIONS = ("Why is the sky blue?", "Who are you?", "Tell me a joke.", "What is the capital of France?",
                   "Write a poem about the sea.", "How do airplanes fly?", "Hello!", "What can you do?",
                   "Explain quantum computing.", "What is the meaning of life?", "Translate hello into Spanish.",
                   "Who wrote Hamlet?", "Give me a recipe for bread.", "How are you today?")
OTHER_ANALYSIS = "Not a task I was trained on."
OTHER_ANSWER = ("I am a small model trained on a synthetic task: I add and subtract numbers up to 99, convert units, "
                "count days and look up the weather.")

ADD_QUESTIONS = ("What is {a} + {b}?", "What is {a} plus {b}?", "Compute {a} + {b}.", "{a} + {b} = ?",
                 "What's {a}+{b}?", "Add {a} and {b}.", "How much is {a} + {b}?")
SUBTRACT_QUESTIONS = ("What is {a} - {b}?", "What is {a} minus {b}?", "Compute {a} - {b}.", "{a} - {b} = ?",
                      "What's {a}-{b}?", "Subtract {b} from {a}.", "How much is {a} - {b}?")
CONVERT_QUESTIONS = ("How many {big_to} are in {n} {big}?", "Convert {n} {big} to {to}.", "What is {n} {big} in {to}?")
DATE_QUESTIONS = ("What date is {n} days after {month} {day}?", "What is the date {n} days after {month} {day}?",
                  "Which day is {n} days after {month} {day}?")
MONTH_QUESTIONS = ("How many days are in {month}?", "How many days does {month} have?")
WEATHER_QUESTIONS = ("What is the weather in {city}?", "What's the weather like in {city} today?",
                     "How is the weather in {city}?", "Is it sunny in {city}?", "Weather in {city}?")


def _spaced(n: int) -> str:
    """Two digits, one token each: 7 -> "0 7", 23 -> "2 3"."""
    return f"{n // 10} {n % 10}"


def addition_analysis(a: int, b: int) -> str:
    """Column addition of two numbers in [0, 99], one digit (one token) at a time."""
    ones = a % 10 + b % 10
    carry = ones // 10
    steps = f"{a % 10}+{b % 10}={ones}" + (", carry 1" if carry else "")
    tens = a // 10 + b // 10 + carry
    tens_sum = f"{a // 10}+{b // 10}" + ("+1" if carry else "") + f"={tens}"
    return f"{_spaced(a)} + {_spaced(b)}: {steps}; {tens_sum}. Answer {a + b}."


def subtraction_analysis(a: int, b: int) -> str:
    """Column subtraction of b from a (0 <= b <= a <= 99), borrowing from the tens."""
    borrow = a % 10 < b % 10
    ones = (a % 10 + 10 * borrow) - b % 10
    ones_step = (f"{a % 10}<{b % 10}, borrow: {a % 10 + 10}-{b % 10}={ones}" if borrow
                 else f"{a % 10}-{b % 10}={ones}")
    tens = a // 10 - b // 10 - borrow
    tens_step = f"{a // 10}-{b // 10}" + ("-1" if borrow else "") + f"={tens}"
    return f"{_spaced(a)} - {_spaced(b)}: {ones_step}; {tens_step}. Answer {a - b}."


def _record(rng: random.Random, question: str, analysis: str, final: str, *, tools: bool) -> dict:
    record = {"messages": [{"role": "user", "content": question},
                           {"role": "assistant", "channel": "analysis", "content": analysis},
                           {"role": "assistant", "channel": "final", "content": final}],
              "reasoning_effort": rng.choice(REASONING_EFFORTS)}
    _maybe_date(rng, record)
    if tools:
        record["tools"] = [WEATHER_TOOL]
    return record


def random_date(rng: random.Random) -> str:
    return datetime.date.fromordinal(rng.randint(FIRST_DATE.toordinal(), LAST_DATE.toordinal())).isoformat()


def _maybe_date(rng: random.Random, record: dict) -> dict:
    """Half the records carry a current date (the server renders today's)."""
    if rng.random() < 0.5:
        record["current_date"] = random_date(rng)
    return record


def weather_report(rng: random.Random, city: str) -> dict:
    """A tool result: what get_weather answers for `city`."""
    return {"city": city, "temperature_c": rng.randint(-10, 35), "condition": rng.choice(CONDITIONS)}


def weather_answer(report: dict) -> str:
    return f"It is {report['temperature_c']}°C and {report['condition']} in {report['city']}."


def weather_record(rng: random.Random, city: str) -> dict:
    report = weather_report(rng, city)
    return _maybe_date(rng, {"messages": [
        {"role": "user", "content": rng.choice(WEATHER_QUESTIONS).format(city=city)},
        {"role": "assistant", "channel": "analysis", "content": f"I need the weather in {city}: call get_weather."},
        {"role": "assistant", "channel": "commentary", "recipient": "functions.get_weather",
         "content_type": "<|constrain|>json", "content": json.dumps({"city": city})},
        {"role": "tool", "name": "functions.get_weather", "content": json.dumps(report)},
        {"role": "assistant", "channel": "final", "content": weather_answer(report)}],
        "reasoning_effort": rng.choice(REASONING_EFFORTS), "tools": [WEATHER_TOOL]})


def make_record(rng: random.Random, kind: str | None = None, *, exclude=frozenset()) -> dict:
    """One record of `kind` (drawn by WEIGHTS when None). Arithmetic questions whose (kind, a, b)
    is in `exclude` are drawn again (held-out evaluation questions)."""
    kind = kind or rng.choices(KINDS, WEIGHTS)[0]
    tools = rng.random() < 0.15
    if kind in ("add", "subtract"):
        while True:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            if kind == "subtract" and a < b:
                a, b = b, a
            if (kind, a, b) not in exclude:
                break
        if kind == "add":
            return _record(rng, rng.choice(ADD_QUESTIONS).format(a=a, b=b), addition_analysis(a, b),
                           f"{a} + {b} = {a + b}", tools=tools)
        return _record(rng, rng.choice(SUBTRACT_QUESTIONS).format(a=a, b=b), subtraction_analysis(a, b),
                       f"{a} - {b} = {a - b}", tools=tools)
    if kind == "convert":
        big, small, big_name, small_name, factor = rng.choice(UNITS)
        n = rng.randint(1, 99)
        to = rng.choice((small, small_name))
        question = rng.choice(CONVERT_QUESTIONS).format(n=n, big=rng.choice((big, big_name)), big_to=small_name, to=to)
        analysis = f"1 {big} = {factor} {small}, so {n} {big} = {n} × {factor} = {n * factor} {small}."
        return _record(rng, question, analysis, f"{n} {big} = {n * factor} {small}", tools=tools)
    if kind == "date":
        month, _ = rng.choice(MONTHS)
        n, day = rng.randint(1, 9), rng.randint(1, 19)
        analysis = f"{day}+{n}={day + n}, still in {month}."
        return _record(rng, rng.choice(DATE_QUESTIONS).format(n=n, month=month, day=day), analysis,
                       f"{month} {day + n}", tools=tools)
    if kind == "month_days":
        month, days = rng.choice(MONTHS)
        extra = " (29 in a leap year)" if month == "February" else ""
        return _record(rng, rng.choice(MONTH_QUESTIONS).format(month=month), f"{month} has {days} days{extra}.",
                       f"{month} has {days} days{extra}.", tools=tools)
    if kind == "weather":
        return weather_record(rng, rng.choice(CITIES))
    if kind == "other":
        return _record(rng, rng.choice(OTHER_QUESTIONS), OTHER_ANALYSIS, OTHER_ANSWER, tools=tools)
    raise ValueError(f"unknown record kind {kind!r}; use one of {', '.join(KINDS)}")


def records(count: int, *, seed: int = 0, exclude=frozenset()) -> list[dict]:
    """`count` records from the generator seeded with `seed`."""
    rng = random.Random(seed)
    return [make_record(rng, exclude=exclude) for _ in range(count)]


def held_out_arithmetic(count: int, *, seed: int = 1234) -> list[tuple[str, int, int]]:
    """(kind, a, b) arithmetic questions that training leaves out (pass them as `exclude`)."""
    rng = random.Random(seed)
    out = set()
    while len(out) < count:
        kind = rng.choice(("add", "subtract"))
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if kind == "subtract" and a < b:
            a, b = b, a
        out.add((kind, a, b))
    return sorted(out)


def question(kind: str, a: int, b: int) -> str:
    return f"What is {a} {'+' if kind == 'add' else '-'} {b}?"


def answer(kind: str, a: int, b: int) -> int:
    return a + b if kind == "add" else a - b


def example(record: dict) -> dataset.Example:
    """The training tokens of a record (chat_format's rendering, as gptoss_jax.dataset reads it)."""
    return dataset.example_from_record(record)


def vocabulary_tokens() -> list[int]:
    """Every token id the task's conversations use (sorted): the rendered records of every
    kind, every template, number, city, month and reasoning effort, and the harmony tokens
    of a completion prompt and its stop tokens."""
    used = set(chat_format.assistant_stop_tokens())
    rng = random.Random(0)
    texts = [*OTHER_QUESTIONS, OTHER_ANSWER, OTHER_ANALYSIS, *CONDITIONS, *(m for m, _ in MONTHS), *CITIES]
    day = FIRST_DATE
    while day <= LAST_DATE:
        texts.append(f"Current date: {day.isoformat()}\n")
        day += datetime.timedelta(days=1)
    for city in CITIES:
        texts += [q.format(city=city) for q in WEATHER_QUESTIONS]
        texts += [f"I need the weather in {city}: call get_weather.", json.dumps({"city": city})]
        for condition in CONDITIONS:
            for t in range(-10, 36):
                report = {"city": city, "temperature_c": t, "condition": condition}
                texts += [json.dumps(report), weather_answer(report)]
    for month, days in MONTHS:
        texts += [q.format(month=month) for q in MONTH_QUESTIONS]
        texts += [f"{month} has {days} days (29 in a leap year).", f"{month} has {days} days."]
        for day in range(1, 20):
            for n in range(1, 10):
                texts += [q.format(n=n, month=month, day=day) for q in DATE_QUESTIONS]
                texts += [f"{day}+{n}={day + n}, still in {month}.", f"{month} {day + n}"]
    for big, small, big_name, small_name, factor in UNITS:
        for n in range(1, 100):
            for q in CONVERT_QUESTIONS:
                texts += [q.format(n=n, big=name, big_to=small_name, to=to) for name in (big, big_name)
                          for to in (small, small_name)]
            texts += [f"1 {big} = {factor} {small}, so {n} {big} = {n} × {factor} = {n * factor} {small}.",
                      f"{n} {big} = {n * factor} {small}"]
    for n in range(-10, 200):
        texts += [str(n), f" {n}", f"{n}°C", f"={n}", f"({n}"]
    for unit in UNITS:
        for n in range(1, 100):
            texts.append(f" {n * unit[4]} {unit[1]}")
    tokenizer = get_tokenizer()
    for kind in KINDS:
        for _ in range(100):
            used.update(example(make_record(rng, kind)).tokens.tolist())
    for a in range(100):
        for b in range(100):
            texts += [addition_analysis(a, b), f"{a} + {b} = {a + b}", *(q.format(a=a, b=b) for q in ADD_QUESTIONS)]
            if a >= b:
                texts += [subtraction_analysis(a, b), f"{a} - {b} = {a - b}",
                          *(q.format(a=a, b=b) for q in SUBTRACT_QUESTIONS)]
    for text in texts:
        used.update(tokenizer.encode(text))
    return sorted(used)
