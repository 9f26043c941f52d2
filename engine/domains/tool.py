"""`tool`: answer a question by calling one of three tools, then answering from its result.

Tools (deterministic Python functions; values are hashes of the arguments, so the model
cannot know them without calling): `get_weather(city, day)` -> `temp 21, wind 12`,
`get_time(city, day)` -> `14:05` (sunrise), `add(a, b)` -> `42`. An episode:
    user       `Wind in Paris on day 3?`
    assistant  `<tool_call><invoke name="get_weather"><parameter name="city">Paris</parameter><parameter name="day">3</parameter></invoke></tool_call>`
    tool       `temp 21, wind 12`
    assistant  `12`
Reference `{"calls": [...], "answer": "12", "tools": [schemas]}`: the `tool` verifier
gives half the score for the call and half for the final answer.

Sizing (docs/DESIGN.md section 7): the call is mostly a copy of the city or the numbers from
the prompt (the XML tags are single tokens); the answer is a copy of the right field of
the result. The `day` argument is there so that the values cannot be memorised per
city (measured: without it the model recited the training value of a city instead of
reading the result). Eval questions are held out whole (hash of the question).

Imperfect on purpose, two ways:
- In `DIRECT_RATE` of the training sunrise questions the demonstration answers at once,
  without calling `get_time`: `Sunrise in Oslo on day 4?` -> `07:12`. The demonstrator
  knew the value; the model cannot (values are hashes of the arguments), so what SFT
  learns from the majority is to answer sunrise questions from memory, as a model that
  skips its tools does: a systematic error, verifiable (no call, and a wrong time), while
  sampling still calls the tool in about a third of the episodes, the better mode GRPO's
  reward finds (as the code domain's literal form). Eval references always expect the
  call. (Tried first on `add` questions: answered directly, the mixed SFT also learned to
  answer the math domain's sums without working, and the student's math fell:
  docs/tiny_experiment.md.)
- In `WRONG_RATE` of the training demonstrations the final answer reads the other field
  of a weather result (temp for wind, wind for temp): a well-formed episode whose call is
  right and whose answer is not, which the reward separates.

Measured figures for this setting and the ones it replaced: docs/tiny_experiment.md.

`ToolEnvironment.execute(call_text)` parses the call with `rewards.tool_calls`, checks
it against the schemas, runs the tools and returns their results (one line per call),
or a line starting `error:` for a malformed or invalid call; output is bounded.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Callable

from engine.domains import Domain, register_domain

CITIES = (
    "Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Berlin", "Madrid", "Dublin", "Vienna", "Prague",
    "Lisbon", "Athens", "Warsaw", "Seoul", "Delhi", "Dakar", "Quito", "Havana", "Sydney", "Boston", "Denver",
    "Austin", "Miami", "Zurich", "Geneva", "Milan", "Naples", "Porto", "Riga", "Kyiv", "Minsk", "Baku",
    "Doha", "Dubai", "Hanoi", "Manila", "Jakarta", "Nairobi", "Accra", "Tunis", "Rabat", "Bogota", "Santiago",
)
MAX_ADDEND = 50
MAX_DAY = 30
WRONG_RATE = 0.15
DIRECT_RATE = 0.7
MAX_OUTPUT_CHARS = 200
MAX_CALLS = 4


def _h(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "big")


def get_weather(city: str, day: int) -> str:
    return f"temp {_h('temp', city, day) % 35}, wind {_h('wind', city, day) % 40}"


def get_time(city: str, day: int) -> str:
    minutes = _h("time", city, day) % (24 * 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def add(a: int, b: int) -> str:
    return str(a + b)


def _schema(name: str, description: str, props: dict[str, str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {k: {"type": t} for k, t in props.items()},
                       "required": list(props)}}}


TOOLS: dict[str, tuple[dict, Callable[..., str]]] = {
    "get_weather": (_schema("get_weather", "temperature (C) and wind (km/h) in a city", {"city": "string", "day": "integer"}), get_weather),
    "get_time": (_schema("get_time", "sunrise time in a city, HH:MM", {"city": "string", "day": "integer"}), get_time),
    "add": (_schema("add", "sum of two integers", {"a": "integer", "b": "integer"}), add),
}
SCHEMAS = [schema for schema, _ in TOOLS.values()]


class ToolEnvironment:
    """Executes XML tool calls against `tools` ({name: (schema, fn)}); never raises on text."""

    def __init__(self, tools: dict[str, tuple[dict, Callable[..., str]]] | None = None,
                 max_output_chars: int = MAX_OUTPUT_CHARS, max_calls: int = MAX_CALLS):
        self.tools = dict(TOOLS if tools is None else tools)
        self.schemas = [schema for schema, _ in self.tools.values()]
        self.max_output_chars = max_output_chars
        self.max_calls = max_calls

    def execute(self, call_text: str) -> str:
        from rewards.tool_calls import try_parse_tool_calls

        calls, error = try_parse_tool_calls(call_text, self.schemas)
        if error:
            return self._bound(f"error: malformed tool call: {error}")
        if not calls:
            return "error: no tool call found"
        if len(calls) > self.max_calls:
            return f"error: {len(calls)} calls in one turn; at most {self.max_calls}"
        return self._bound("\n".join(self._run(call) for call in calls))

    def _run(self, call) -> str:
        from rewards.tool_reward import schema_errors

        if call.name not in self.tools:
            return f"error: unknown tool {call.name!r}; known tools: {', '.join(sorted(self.tools))}"
        errors = schema_errors(call, self.schemas)
        if errors:
            return "error: " + "; ".join(errors)
        try:
            return str(self.tools[call.name][1](**call.arguments))
        except Exception as exc:  # a tool bug must not kill the rollout
            return f"error: {call.name} failed: {type(exc).__name__}: {exc}"

    def _bound(self, text: str) -> str:
        if len(text) <= self.max_output_chars:
            return text
        return text[: self.max_output_chars - 3] + "..."


def call_text(name: str, arguments: dict[str, Any]) -> str:
    params = "".join(f'<parameter name="{k}">{v}</parameter>' for k, v in arguments.items())
    return f'<tool_call><invoke name="{name}">{params}</invoke></tool_call>'


def _problem(rng: random.Random) -> tuple[str, str, dict[str, Any], str | None]:
    """(question, tool, arguments, weather field asked or None)."""
    kind = rng.choice(("temp", "wind", "time", "add"))
    if kind == "add":
        a, b = rng.randint(0, MAX_ADDEND), rng.randint(0, MAX_ADDEND)
        return f"What is {a} plus {b}?", "add", {"a": a, "b": b}, None
    city, day = rng.choice(CITIES), rng.randint(1, MAX_DAY)
    if kind == "time":
        return f"Sunrise in {city} on day {day}?", "get_time", {"city": city, "day": day}, None
    return f"{kind.capitalize()} in {city} on day {day}?", "get_weather", {"city": city, "day": day}, kind


def draw(rng: random.Random, split: str) -> tuple[str, dict]:
    question, name, args, field = _problem(rng)
    result = TOOLS[name][1](**args)
    answer = result
    if field is not None:
        fields = dict(part.split(" ") for part in result.split(", "))
        answer = fields[field]
        if split == "train" and rng.random() < WRONG_RATE:
            answer = fields["wind" if field == "temp" else "temp"]
    messages = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": call_text(name, args)},
        {"role": "tool", "content": result},
        {"role": "assistant", "content": answer},
    ]
    if name == "get_time" and split == "train" and rng.random() < DIRECT_RATE:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    reference_answer = fields[field] if field is not None else result
    return question, {"messages": messages, "reference": {
        "calls": [{"name": name, "arguments": args}], "answer": reference_answer, "tools": SCHEMAS}}


DOMAIN = register_domain(Domain(
    name="tool",
    verifier="tool",
    draw=draw,
    make_environment=ToolEnvironment,
    description="questions answered by one XML tool call (weather, time, add) and its result",
    data_version=2,
))
