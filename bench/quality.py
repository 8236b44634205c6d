"""Answer quality of the catalog's chat models on coding requests: which one `thox-coder` names.

One thoxd daemon (started here on a free loopback port with both model files, unless --url names
a running one) serves every model of the catalog; each model gets, through /v1/chat/completions
(its own chat template, stops and defaults, as a client gets it):

- the device docs' examples, as written there: "Hello!" with their system message (temperature
  0.7, max_tokens 1024), "Explain async/await", "Write a quicksort in Python" (its code is run on
  a list) and "Write a quicksort in TypeScript";
- 20 "write a function" requests, each with a tiny test. From the answer the script takes the
  fenced block (or, without one, the lines from `def NAME(`), parses it with `ast`, then runs it
  with its test in a separate Python (isolated mode, a scratch directory, a 5 s CPU limit).

At most 384 tokens an answer where the docs set no max_tokens (the "Hello!" request sets 1024).
`--loops N` also asks each docs example N more times at the catalog defaults (seeds 0..N-1, at
most 1024 tokens) and counts the answers that ran to max_tokens: a small model that loops
repeats itself until it is cut off.

Each request runs alone (greedy text can differ when requests share a decode step), twice:
greedy (`temperature` 0) and with the catalog's defaults (with `seed` 1, so a rerun gives the
same text). Prints per model and mode: answered at all, valid Python defining the function,
passes its test; then a few answers. Usage: .venv/bin/python bench/quality.py [--models ID ...]
[--json PATH] [--show N]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from thoxd.catalog.entries import Catalog

REPO = Path(__file__).resolve().parent.parent

# (function name, request, test run after the answer's code)
TASKS: list[tuple[str, str, str]] = [
    ("add", "Write a Python function `add(a, b)` that returns the sum of a and b.",
     "assert add(2, 3) == 5 and add(-1, 1) == 0"),
    ("is_even", "Write a Python function `is_even(n)` that returns True if n is even, else False.",
     "assert is_even(4) is True and is_even(7) is False and is_even(0) is True"),
    ("factorial", "Write a Python function `factorial(n)` that returns n! (factorial(0) is 1).",
     "assert factorial(0) == 1 and factorial(5) == 120"),
    ("reverse_string", "Write a Python function `reverse_string(s)` that returns s reversed.",
     "assert reverse_string('abc') == 'cba' and reverse_string('') == ''"),
    ("max_of_list", "Write a Python function `max_of_list(xs)` that returns the largest number "
     "in the list xs.", "assert max_of_list([3, 9, 2]) == 9 and max_of_list([-5, -2]) == -2"),
    ("count_vowels", "Write a Python function `count_vowels(s)` that returns how many vowels "
     "(a, e, i, o, u) the lowercase string s contains.",
     "assert count_vowels('hello world') == 3 and count_vowels('xyz') == 0"),
    ("is_palindrome", "Write a Python function `is_palindrome(s)` that returns True if the "
     "string s reads the same backwards, else False.",
     "assert is_palindrome('racecar') and not is_palindrome('python')"),
    ("fibonacci", "Write a Python function `fibonacci(n)` that returns the n-th Fibonacci "
     "number, with fibonacci(0) == 0 and fibonacci(1) == 1.",
     "assert [fibonacci(i) for i in range(8)] == [0, 1, 1, 2, 3, 5, 8, 13]"),
    ("celsius_to_fahrenheit", "Write a Python function `celsius_to_fahrenheit(c)` that converts "
     "a temperature in Celsius to Fahrenheit.",
     "assert celsius_to_fahrenheit(0) == 32 and celsius_to_fahrenheit(100) == 212"),
    ("square_list", "Write a Python function `square_list(xs)` that returns a new list with "
     "the square of each number in xs.", "assert square_list([1, 2, 3]) == [1, 4, 9]"),
    ("sum_list", "Write a Python function `sum_list(xs)` that returns the sum of the numbers "
     "in the list xs.", "assert sum_list([1, 2, 3, 4]) == 10 and sum_list([]) == 0"),
    ("is_prime", "Write a Python function `is_prime(n)` that returns True if n is a prime "
     "number, else False.",
     "assert [n for n in range(20) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19]"),
    ("gcd", "Write a Python function `gcd(a, b)` that returns the greatest common divisor of "
     "two positive integers.", "assert gcd(12, 18) == 6 and gcd(7, 5) == 1"),
    ("to_upper", "Write a Python function `to_upper(s)` that returns the string s in upper "
     "case.", "assert to_upper('Hello') == 'HELLO'"),
    ("average", "Write a Python function `average(xs)` that returns the average of the numbers "
     "in the list xs.", "assert average([1, 2, 3, 4]) == 2.5"),
    ("remove_duplicates", "Write a Python function `remove_duplicates(xs)` that returns the "
     "list xs without duplicates, keeping the first occurrence of each item in order.",
     "assert remove_duplicates([3, 1, 3, 2, 1]) == [3, 1, 2]"),
    ("count_words", "Write a Python function `count_words(s)` that returns the number of words "
     "in the string s (words are separated by whitespace).",
     "assert count_words('the quick  brown fox') == 4 and count_words('') == 0"),
    ("min_max", "Write a Python function `min_max(xs)` that returns a tuple (smallest, "
     "largest) of the numbers in the list xs.", "assert tuple(min_max([4, 1, 9, 3])) == (1, 9)"),
    ("flatten", "Write a Python function `flatten(xss)` that takes a list of lists and returns "
     "one list with all their items in order.",
     "assert flatten([[1, 2], [3], []]) == [1, 2, 3]"),
    ("fizzbuzz", "Write a Python function `fizzbuzz(n)` that returns 'Fizz' if n is divisible "
     "by 3, 'Buzz' if by 5, 'FizzBuzz' if by both, and otherwise str(n).",
     "assert [fizzbuzz(i) for i in (3, 5, 15, 7)] == ['Fizz', 'Buzz', 'FizzBuzz', '7']"),
]  # fmt: skip

# The device docs' examples (the Thox device API reference), as their requests are written.
DOCS: list[tuple[str, dict[str, object]]] = [
    ("hello", {
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Hello!"}],
        "temperature": 0.7, "max_tokens": 1024}),
    ("async/await", {"messages": [{"role": "user", "content": "Explain async/await"}]}),
    ("quicksort py", {"messages": [{"role": "user", "content": "Write a quicksort in Python"}]}),
    ("quicksort ts", {
        "messages": [{"role": "user", "content": "Write a quicksort in TypeScript"}]}),
]  # fmt: skip

# Whatever the quicksort's signature (a new list, in place, or (arr, low, high)), it must sort.
QUICKSORT_TEST = """
import inspect
_fs = [v for k, v in list(globals().items()) if 'sort' in k.lower() and inspect.isfunction(v)]
assert _fs, 'no sort function'
_f = _fs[0]
_xs = [5, 3, 8, 1, 9, 2, 7, 3]
try:
    _out = _f(list(_xs)) if len(inspect.signature(_f).parameters) == 1 else None
except TypeError:
    _out = None
if _out is None:
    _ys = list(_xs)
    _n = len(inspect.signature(_f).parameters)
    _out = _f(_ys) if _n == 1 else _f(_ys, 0, len(_ys) - 1)
    _out = _ys if _out is None else _out
assert list(_out) == sorted(_xs), _out
"""

FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


@dataclass
class Answer:
    model: str
    mode: str  # "greedy" or "defaults"
    task: str
    text: str
    tokens: int
    finish: str
    answered: bool = False
    valid: bool = False  # parses, and defines the function asked for (or a sort function)
    passes: bool = False


def extract_code(text: str, name: str) -> str:
    """The answer's code: the fenced block that defines a function matching the pattern `name`
    (else the first Python one), or without a fence, the lines from `def name(` while they
    stay indented."""
    blocks = FENCE.findall(text)
    for _, body in blocks:
        if re.search(rf"def\s+{name}\s*\(", body):
            return str(body)
    for lang, body in blocks:
        if lang.lower() in ("", "python", "py", "python3"):
            return str(body)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"\s*def\s+{name}\s*\(", line):
            indent = len(line) - len(line.lstrip())
            kept = [line[indent:]]
            for more in lines[i + 1 :]:
                if more.strip() and len(more) - len(more.lstrip()) <= indent:
                    break
                kept.append(more[indent:])
            return "\n".join(kept)
    return ""


def defines(code: str, name: str) -> bool:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return any(
        isinstance(node, ast.FunctionDef) and re.fullmatch(name, node.name)
        for node in ast.walk(tree)
    )


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (5, 5))
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def passes(code: str, test: str) -> bool:
    """Whether `code` then `test` exit 0 in a separate, isolated Python with CPU and memory caps
    (model output is untrusted code)."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", code + "\n" + test],
                cwd=scratch,
                capture_output=True,
                timeout=10,
                preexec_fn=_limits,
                env={"PATH": "/usr/bin:/bin"},
            )
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def ask(
    url: str, model: str, body: dict[str, object], mode: str, extra: dict[str, object]
) -> tuple[str, int, str]:
    request: dict[str, object] = {"model": model, "max_tokens": 384, **body, **extra}
    if mode == "greedy":
        request["temperature"] = 0
    else:  # what the request leaves out comes from the catalog
        request.setdefault("seed", 1)
    response = httpx.post(url + "/v1/chat/completions", json=request, timeout=600)
    response.raise_for_status()
    data = response.json()
    choice = data["choices"][0]
    return (
        choice["message"]["content"] or "",
        data["usage"]["completion_tokens"],
        choice["finish_reason"],
    )


def grade(model: str, mode: str, task: str, text: str, tokens: int, finish: str) -> Answer:
    answer = Answer(model, mode, task, text, tokens, finish, answered=bool(text.strip()))
    spec = next((t for t in TASKS if t[0] == task), None)
    if spec is not None:
        code = extract_code(text, re.escape(spec[0]))
        answer.valid = defines(code, re.escape(spec[0]))
        answer.passes = answer.valid and passes(code, spec[2])
    elif task == "quicksort py":
        code = extract_code(text, r"\w*sort\w*")
        answer.valid = defines(code, r"\w*sort\w*")
        answer.passes = answer.valid and passes(code, QUICKSORT_TEST)
    return answer


def run(url: str, models: list[str], extra: dict[str, object]) -> list[Answer]:
    answers = []
    for model in models:
        for mode in ("greedy", "defaults"):
            started = time.monotonic()
            for name, body in DOCS:
                answers.append(grade(model, mode, name, *ask(url, model, body, mode, extra)))
            for name, request, _ in TASKS:
                body = {"messages": [{"role": "user", "content": request}]}
                answers.append(grade(model, mode, name, *ask(url, model, body, mode, extra)))
            took = time.monotonic() - started
            print(f"  {model} {mode}: {len(DOCS) + len(TASKS)} requests in {took:.0f} s")
    return answers


def loops(url: str, models: list[str], extra: dict[str, object], seeds: int) -> None:
    """Each docs example `seeds` times at the catalog defaults: how many ran to max_tokens."""
    for model in models:
        cut = []
        for name, body in DOCS:
            for seed in range(seeds):
                request = {"max_tokens": 1024, **body, "seed": seed}
                *_, finish = ask(url, model, request, "defaults", extra)
                if finish == "length":
                    cut.append(f"{name} (seed {seed})")
        total = len(DOCS) * seeds
        print(f"{model}: {len(cut)} of {total} docs answers ran to max_tokens: {', '.join(cut)}")


def report(answers: list[Answer], show: int) -> None:
    tasks = {t[0] for t in TASKS}
    print("\nmodel                   mode      answered  valid  passes   (of 20 functions)"
          "   quicksort py   mean tokens   ran to max_tokens (of all)")  # fmt: skip
    for model in dict.fromkeys(a.model for a in answers):
        for mode in ("greedy", "defaults"):
            mine = [a for a in answers if a.model == model and a.mode == mode]
            funcs = [a for a in mine if a.task in tasks]
            qs = next(a for a in mine if a.task == "quicksort py")
            qs_word = "passes" if qs.passes else "valid" if qs.valid else "fails"
            mean = sum(a.tokens for a in funcs) / len(funcs)
            print(
                f"{model:22}  {mode:8}  {sum(a.answered for a in funcs):8}  "
                f"{sum(a.valid for a in funcs):5}  {sum(a.passes for a in funcs):6}"
                f"                       {qs_word:13}  {mean:6.0f}"
                f"        {sum(a.finish == 'length' for a in mine):3} of {len(mine)}"
            )
    for model in dict.fromkeys(a.model for a in answers):
        greedy = [a for a in answers if a.model == model and a.mode == "greedy"]
        print(f"\n==== {model}, greedy: the device docs' examples and {show} function answers")
        for a in greedy[: len(DOCS) + show]:
            graded = a.task in tasks or a.task == "quicksort py"
            flags = f"valid={a.valid} passes={a.passes}" if graded else ""
            print(f"---- {a.task} ({a.tokens} tokens, {a.finish}) {flags}")
            print(a.text if len(a.text) < 900 else a.text[:900] + " [...]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_daemon(tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    models = os.environ.get("THOXD_TEST_MODELS", str(Path.home() / ".cache" / "thoxd-test"))
    cmd = [
        sys.executable, "-m", "thoxd", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--state-dir", tmp, "--models-dir", models, "--mdns", "false", "--slots", "1",
    ]  # fmt: skip
    daemon = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return daemon, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or daemon.poll() is not None:
            daemon.terminate()
            raise SystemExit("thoxd did not become ready")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", help="a running daemon (default: start one here)")
    parser.add_argument("--models", nargs="+", help="catalog ids (default: every chat model)")
    parser.add_argument("--json", type=Path, help="write every answer here")
    parser.add_argument("--show", type=int, default=3, help="function answers printed per model")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="a request field for every request, e.g. repeat_penalty=1.0 (repeatable)",
    )
    parser.add_argument("--loops", type=int, default=0, metavar="N", help="see above")
    args = parser.parse_args()
    extra = {k: json.loads(v) for k, v in (p.split("=", 1) for p in args.param)}
    models = args.models or [
        s.id for s in Catalog.load(REPO / "models.toml") if "chat" in s.capabilities
    ]
    with tempfile.TemporaryDirectory() as tmp:
        daemon, url = (None, args.url) if args.url else start_daemon(tmp)
        try:
            answers = run(url, models, extra)
            if args.loops:
                loops(url, models, extra, args.loops)
        finally:
            if daemon is not None:
                daemon.terminate()
                daemon.wait(30)
    report(answers, args.show)
    if args.json:
        args.json.write_text(json.dumps([asdict(a) for a in answers], indent=1))


if __name__ == "__main__":
    main()
