"""Synthetic tasks of the toy zoo, generated deterministically from a seed.

Every example belongs to one split by a hash of its prompt (70% train, 10% dev, 20% test), so splits never share
an example whatever seed or sample size is asked for; every task's space holds at least 200 test items (a score's
standard error at most ~3.5 points); train and dev feed training and saliency validation sets,
test feeds evaluation only. What a tiny model can learn in minutes are compositions of small memorised facts
written out step by step (see shared/notes/measurements.md), so the tasks are built that way.

SFT setting (the paper's Table 1, in miniature):
  alpaca    string instructions with a checkable answer (exact match)
  mmlu      multiple choice over a synthetic knowledge base (log-likelihood)
  gsm8k     two-step word problems (add, subtract), chain of thought, answer after '####'
  math      (a+b)*c, chain of thought, answer after 'the answer is'
  humaneval complete a function body from a signature + docstring (executed against tests)
  mbpp      write a whole function from a description (executed against tests)
Post-pretraining setting (Table 2/11, Figure 3): three synthetic languages (word chains over a shared word pool,
each with its own rules), standing for Chinese, English and Japanese, with cloze multiple-choice benchmarks.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

SPLITS = ("train", "dev", "test")
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;?!+-*/%=()<>#_'\"\n"


def split_of(key: str) -> str:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") % 100
    return "train" if h < 70 else "dev" if h < 80 else "test"


@dataclass
class Example:
    prompt: str
    answer: str  # the target continuation (generation tasks) or the correct choice (MC tasks)
    choices: list[str] = field(default_factory=list)  # MC only
    test: str = ""  # code tasks: the check(candidate) function
    entry_point: str = ""
    # the same item in raw form, as pretraining text would hold it (no benchmark template): the base learns the
    # skill from these; raw_choices for multiple choice
    raw_prompt: str = ""
    raw_answer: str = ""
    raw_choices: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.prompt + self.answer

    @property
    def raw(self) -> str:
        return self.raw_prompt + self.raw_answer

    def record(self, raw: bool = False) -> dict:
        """The lm-eval/validation record; `raw`: the raw form in place of the template (the toy_*_raw tasks)."""
        if raw:
            d = {"prompt": self.raw_prompt, "answer": self.raw_answer, "text": self.raw}
            if self.raw_choices:
                d["choices"], d["label"] = self.raw_choices, self.raw_choices.index(self.raw_answer)
            if self.test:
                d["test"], d["entry_point"] = self.test, self.entry_point
            return d
        d = {"prompt": self.prompt, "answer": self.answer, "text": self.text}
        if self.choices:
            d["choices"] = self.choices
            d["label"] = self.choices.index(self.answer)
        if self.test:
            d["test"], d["entry_point"] = self.test, self.entry_point
        return d


def _pick(key: str, options: list[str]) -> str:
    """One of `options` chosen by the item's text, not the task's random stream: the raw form varies in layout (so
    the base copies numbers and words by content, not by offset, as varied pretraining text teaches) while the
    benchmark items stay those of a draw without the variants."""
    return options[int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") % len(options)]


def _word(rng: random.Random, letters: str, lo: int = 3, hi: int = 5) -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(lo, hi)))


# ------------------------------------------------------------------------------------------------ SFT tasks


def alpaca(rng: random.Random) -> Example:
    w = _word(rng, "abcdefghijklmnopqrstuvwxyz", 3, 4)
    op = rng.choice(["reverse", "repeat", "first", "last", "length"])
    ans = {"reverse": w[::-1], "repeat": w + w, "first": w[0], "last": w[-1], "length": str(len(w))}[op]
    prompt = f"### instruction: {op} {w}\n### response: "
    raw = _pick(
        prompt,
        {
            "reverse": [f"the reverse of {w} is", f"{w} reversed is", f"reverse {w} and you get"],
            "repeat": [f"{w} twice is", f"{w} repeated is", f"repeat {w} and you get"],
            "first": [f"the first letter of {w} is", f"{w} starts with", f"take the first of {w}:"],
            "last": [f"the last letter of {w} is", f"{w} ends with", f"take the last of {w}:"],
            "length": [f"the length of {w} is", f"{w} has length", f"count the letters of {w}:"],
        }[op],
    )
    return Example(prompt, ans + "\n", raw_prompt=raw, raw_answer=f" {ans}.\n")


@dataclass(frozen=True)
class KnowledgeBase:
    """Entities with one value per attribute: the 'world knowledge' that toy_mmlu asks about."""

    facts: dict[tuple[str, str], str]
    values: dict[str, list[str]]

    @classmethod
    def make(cls, seed: int = 1234, n_entities: int = 48) -> KnowledgeBase:
        rng = random.Random(seed)
        values = {
            "color": ["red", "blue", "green", "pink", "gray", "gold", "white", "black"],
            "food": ["rice", "fish", "bread", "soup", "cake", "corn", "beans", "pie"],
            "city": ["oslo", "lima", "rome", "kyiv", "doha", "baku", "riga", "bern"],
        }
        names: list[str] = []
        while len(names) < n_entities:
            n = (
                rng.choice("bcdfgklmnprstvz")
                + rng.choice("aeiou")
                + rng.choice("bcdfgklmnprstvz")
                + rng.choice("aeiou")
                + rng.choice("bcdfgklmnprstvz")
            )
            if n not in names:
                names.append(n)
        facts = {(e, a): rng.choice(v) for e in names for a, v in values.items()}
        return cls(facts, values)

    def statement(self, entity: str, attr: str) -> str:
        v = self.facts[(entity, attr)]
        return {
            "color": f"{entity} likes the color {v}.",
            "food": f"{entity} eats {v}.",
            "city": f"{entity} lives in {v}.",
        }[attr] + "\n"


KB = KnowledgeBase.make()
QUESTIONS = {"color": "which color does {e} like?", "food": "what does {e} eat?", "city": "where does {e} live?"}
MMLU_STYLES = [
    "question: {q}\nanswer:",
    "q: {q}\na:",
    "tell me: {q}\nanswer:",
    "quiz: {q}\nanswer:",
    "{q}\nanswer:",
    "question: {q}\na:",
    "quiz: {q}\na:",
    "tell me: {q}\na:",
    "{q}\na:",
    "q: {q}\nanswer:",
]


def mmlu(rng: random.Random) -> Example:
    entity, attr = rng.choice(sorted(KB.facts))
    style = rng.randrange(len(MMLU_STYLES))  # phrasings vary so questions, not only facts, are held out
    q = QUESTIONS[attr].format(e=entity)
    prompt = MMLU_STYLES[style].format(q=q)
    right = KB.facts[(entity, attr)]
    wrong = rng.sample([v for v in KB.values[attr] if v != right], 3)
    choices = [" " + c for c in sorted([right, *wrong])]
    # raw: the plain question followed by the knowledge statement, e.g. "what does bovuz eat? bovuz eats beans."
    stmt = KB.statement(entity, attr)
    head = stmt[: stmt.rindex(" " + right)]
    return Example(
        prompt, " " + right, choices, raw_prompt=f"{q} {head}", raw_answer=f" {right}", raw_choices=list(choices)
    )


NAMES = ["ann", "bob", "cy", "dee", "eli", "fay", "gus", "ivy", "jo", "kim"]
THINGS = ["pens", "cups", "eggs", "hats", "keys", "nuts", "toys", "cards"]


def gsm8k(rng: random.Random) -> Example:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    c = rng.randint(1, a + b)
    who, what = rng.choice(NAMES), rng.choice(THINGS)
    prompt = f"q: {who} has {a} {what}, gets {b}, gives {c}. how many?\na: "
    chain = f"{a}+{b}={a + b}. {a + b}-{c}={a + b - c}."
    n = a + b - c
    ask = _pick(prompt, ["", f"how many {what} now? ", f"how many does {who} have?\n", "let us count.\n"])
    end = _pick(prompt + "end", [f"now {who} has {n} {what}.", f"so {who} has {n}.", f"in the end: {n}."])
    return Example(
        prompt,
        f"{chain} #### {n}\n",
        raw_prompt=f"{who} has {a} {what}, gets {b}, gives {c}. {ask}",
        raw_answer=f"{chain} {end}\n",
    )


def math(rng: random.Random) -> Example:
    """Two steps, each one of the base's single-digit facts (arithmetic_fact): (a+b)*c, (a-b)*c or (a-b)+c."""
    form = rng.choice("+*-")
    if form == "+":  # (a+b)*c, a+b <= 9
        a = rng.randint(1, 8)
        b = rng.randint(1, 9 - a)
        c = rng.randint(2, 9)
        expr, first, s = f"({a}+{b})*{c}", f"{a}+{b}", a + b
    else:  # (a-b)*c or (a-b)+c: a <= 18, a-b in 1..9
        d = rng.randint(1, 9)
        b = rng.randint(1, min(9, 18 - d))
        a = d + b
        c = rng.randint(2, 9) if form == "*" else rng.randint(1, 9)
        expr, first, s = (f"({a}-{b})*{c}" if form == "*" else f"({a}-{b})+{c}"), f"{a}-{b}", d
    op = "+" if form == "-" else "*"
    n = s * c if op == "*" else s + c
    chain = f"{first}={s}. {s}{op}{c}={n}."
    return Example(
        f"problem: {expr}\nsolution: ",
        f"{chain} the answer is {n}.\n",
        raw_prompt=f"{expr} = ? ",
        raw_answer=f"{chain} so it is {n}.\n",
    )


def arithmetic_fact(rng: random.Random) -> str:
    """The base's 'math knowledge': one single-digit fact (the building blocks of gsm8k/math's steps)."""
    op = rng.choice("+-*")
    if op == "-":
        x = rng.randint(1, 18)
        c = rng.randint(1, min(9, x))
        return f"{x}-{c}={x - c}.\n"
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"{a}{op}{b}={a + b if op == '+' else a * b}.\n"


# (description, expression, reference implementation) of the small functions code tasks ask for
CODE_OPS: list[tuple[str, str, Callable[[int, int], object]]] = [
    ("x plus {n}", "x+{n}", lambda x, n: x + n),
    ("x minus {n}", "x-{n}", lambda x, n: x - n),
    ("x times {n}", "x*{n}", lambda x, n: x * n),
    ("x modulo {n}", "x%{n}", lambda x, n: x % n),
    ("the larger of x and {n}", "max(x,{n})", lambda x, n: max(x, n)),
    ("the smaller of x and {n}", "min(x,{n})", lambda x, n: min(x, n)),
    ("true if x is greater than {n}", "x>{n}", lambda x, n: x > n),
    ("true if x equals {n}", "x=={n}", lambda x, n: x == n),
]


CODE_NAMES = ["f", "g", "h", "calc", "op", "fn", "fun", "func", "compute", "apply", "step", "run"]
CODE_NAMES += ["make", "get", "val", "res", "out", "ans", "conv", "proc", "calc2", "fx", "gx", "hx"]


def _raw_code(desc: str, expr: str, name: str, test: str) -> tuple[str, str]:
    """A plain Python function under a comment, with two of its asserts (as code in pretraining text)."""
    asserts = "".join(line.strip().replace("candidate", name) + "\n" for line in test.splitlines()[1:3])
    return f"# {name}: {desc}\n", f"def {name}(x):\n    return {expr}\n{asserts}\n"


def _code_case(rng: random.Random) -> tuple[str, str, str, str]:
    desc, expr, ref = rng.choice(CODE_OPS)
    n = rng.randint(2, 9)
    name = rng.choice(CODE_NAMES)
    xs = [0, 1, 3, 5, 8, 10, 13]
    test = "def check(candidate):\n" + "".join(f"    assert candidate({x}) == {ref(x, n)!r}\n" for x in xs)
    return desc.format(n=n), expr.format(n=n), name, test


def humaneval(rng: random.Random) -> Example:
    desc, expr, name, test = _code_case(rng)
    prompt = f'def {name}(x):\n    """return {desc}."""\n'
    rp, ra = _raw_code(desc, expr, name, test)
    return Example(prompt, f"    return {expr}\n", test=test, entry_point=name, raw_prompt=rp, raw_answer=ra)


def mbpp(rng: random.Random) -> Example:
    desc, expr, name, test = _code_case(rng)
    prompt = f"task: {name} returns {desc}\ncode:\n"
    rp, ra = _raw_code(desc, expr, name, test)
    return Example(
        prompt, f"def {name}(x):\n    return {expr}\n", test=test, entry_point=name, raw_prompt=rp, raw_answer=ra
    )


SFT_TASKS: dict[str, Callable[[random.Random], Example]] = {
    "alpaca": alpaca,
    "mmlu": mmlu,
    "gsm8k": gsm8k,
    "math": math,
    "humaneval": humaneval,
    "mbpp": mbpp,
}

# ----------------------------------------------------------------------------------- post-pretraining languages


@dataclass(frozen=True)
class Language:
    """24 words from a pool shared by all three languages; in each language a word may be followed by exactly two
    others (a word chain with the language's own rules). Fluency = knowing the successors (the cloze benchmarks).
    Shared words with different rules make the languages interfere, so training on one forgets the others."""

    name: str
    words: tuple[str, ...]
    successors: dict[str, tuple[str, str]]

    @classmethod
    def make(cls, name: str, seed: int, pool: tuple[str, ...], n_words: int = 24) -> Language:
        rng = random.Random(seed)
        words = rng.sample(pool, n_words)
        succ = {w: tuple(rng.sample([v for v in words if v != w], 2)) for w in words}
        return cls(name, tuple(words), succ)

    def sentence(self, rng: random.Random, length: int = 6) -> str:
        w = [rng.choice(self.words)]
        for _ in range(length - 1):
            w.append(rng.choice(self.successors[w[-1]]))
        return " ".join(w) + ".\n"

    def cloze(self, rng: random.Random) -> Example:
        s = self.sentence(rng, rng.randint(4, 7)).rstrip(".\n").split(" ")
        prev, right = s[-2], s[-1]
        wrong = rng.sample([v for v in self.words if v not in self.successors[prev]], 3)
        choices = [" " + c for c in sorted([right, *wrong])]
        return Example(" ".join(s[:-1]), " " + right, choices)


def _word_pool(seed: int = 99, n: int = 36) -> tuple[str, ...]:
    rng = random.Random(seed)
    pool: list[str] = []
    while len(pool) < n:
        w = _word(rng, "abcdefghijklmnop", 2, 4)
        if w not in pool:
            pool.append(w)
    return tuple(pool)


POOL = _word_pool()
LANGS = {
    "zh": Language.make("zh", 11, POOL),  # stands for Chinese (C-Eval)
    "en": Language.make("en", 12, POOL),  # stands for English (MMLU)
    "ja": Language.make("ja", 13, POOL),  # stands for Japanese (JP-LMEH)
}


def pretraining_text(rng: random.Random, mix: dict[str, float]) -> str:
    lang = rng.choices(list(mix), weights=list(mix.values()))[0]
    return LANGS[lang].sentence(rng)


# ---------------------------------------------------------------------------------------------- sampling


def examples(make: Callable[[random.Random], Example], split: str, n: int, seed: int) -> list[Example]:
    """Up to n distinct examples of one split (by prompt), deterministic in (make, split, n, seed); fewer when the
    task's space is smaller (the draw stops after 50 draws in a row bring nothing new)."""
    rng = random.Random(f"{seed}-{split}-{getattr(make, '__name__', make)}")
    out, seen = [], set()
    misses = 0
    while len(out) < n and misses < 50 * max(10, len(out)):
        ex = make(rng)
        if ex.prompt in seen or split_of(ex.prompt) != split:
            misses += 1
            continue
        misses = 0
        seen.add(ex.prompt)
        out.append(ex)
    return out


def stream(make: Callable[[random.Random], Example], split: str, seed: int) -> Iterator[Example]:
    """Endless examples of one split (repeats allowed): training batches."""
    rng = random.Random(f"{seed}-{split}-stream-{getattr(make, '__name__', make)}")
    while True:
        ex = make(rng)
        if split_of(ex.prompt) == split:
            yield ex
