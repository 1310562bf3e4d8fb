"""Verifiable tasks for RL and SFT on embedded data: arithmetic, knowledge-graph questions, JSONL files.

Every task is a `Task`: a prompt ending in "A:" (for the generated families), the answer text, and
the name of the verifier that checks a response. A response answers with the text up to the first
END_MARKER (a newline); `score` gives a correctness reward from the verifier and a separate format
reward (the answer line is terminated by the marker, non-empty and, for numeric tasks, a number).
Train and held-out splits are decided by a seeded hash of the problem (the numbers, the person) or
by the question template, so the same problem always lands in the same split, whatever else is asked.
Pure Python: no network, no Lightning, no Hydra.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from datamodules.jsonl import iter_jsonl, where
from datamodules.synthetic_bios import TEMPLATES, BiographyCorpus, person_facts

__all__ = ["END_MARKER", "QUESTION_TEMPLATES", "SPLITS", "Task", "VERIFIERS", "arithmetic_tasks",
           "carry_trace", "demonstration", "exact_match", "extract_answer", "format_ok", "in_held_out",
           "knowledge_tasks", "load_jsonl_tasks", "numeric_match", "parse_number", "score"]

END_MARKER = "\n"  # an answer is the response text up to the first END_MARKER
SPLITS = ("train", "held_out")


@dataclass(frozen=True)
class Task:
    """One verifiable problem.

    answer: the canonical answer (the SFT target); accepted: further answers scored as correct
    (a person with two hobbies). verifier: a key of VERIFIERS. solution: a worked reference
    solution or hint, None if there is none. meta: provenance (operands, subject, template, ...).
    """

    prompt: str
    answer: str
    name: str
    difficulty: int
    verifier: str = "exact"
    solution: Optional[str] = None
    accepted: tuple[str, ...] = ()
    meta: Mapping = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        for key in ("prompt", "answer", "name"):
            if not isinstance(getattr(self, key), str):
                raise TypeError(f"Task.{key} must be a string, got {type(getattr(self, key)).__name__}")
        if not self.answer.strip() or END_MARKER in self.answer:
            raise ValueError(f"Task.answer must be non-empty and must not contain the end marker "
                             f"{END_MARKER!r}, got {self.answer!r}")
        if isinstance(self.difficulty, bool) or not isinstance(self.difficulty, int) or self.difficulty < 0:
            raise ValueError(f"Task.difficulty must be an int >= 0, got {self.difficulty!r}")
        if self.verifier not in VERIFIERS:
            raise ValueError(f"Task.verifier must be one of {sorted(VERIFIERS)}, got {self.verifier!r}")
        if self.verifier == "numeric":
            for a in (self.answer, *self.accepted):
                if parse_number(a) is None:
                    raise ValueError(f"Task.answer {a!r} is not a number, as the numeric verifier needs")

    @property
    def answers(self) -> tuple[str, ...]:
        return (self.answer, *self.accepted)


# ---------------------------------------------------------------------------
# Verifiers and rewards
# ---------------------------------------------------------------------------

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def extract_answer(response: str) -> str:
    """The answer a response gives: its text up to the first END_MARKER (or its end), stripped."""
    return response.split(END_MARKER, 1)[0].strip()


def parse_number(text: str) -> Optional[float]:
    """`text` (stripped) as a finite number, or None if it is not exactly one integer or decimal."""
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def exact_match(predicted: str, answer: str) -> bool:
    """Equal after stripping and collapsing runs of whitespace; case matters."""
    return " ".join(predicted.split()) == " ".join(answer.split())


def numeric_match(predicted: str, answer: str, rel_tol: float = 1e-9, abs_tol: float = 1e-6) -> bool:
    """Both parse as numbers and agree within `math.isclose(rel_tol, abs_tol)`."""
    p, a = parse_number(predicted), parse_number(answer)
    return p is not None and a is not None and math.isclose(p, a, rel_tol=rel_tol, abs_tol=abs_tol)


VERIFIERS: dict[str, Callable[[str, str], bool]] = {"exact": exact_match, "numeric": numeric_match}


def _check_verifier(verifier: str, arg: str = "verifier") -> str:
    if verifier not in VERIFIERS:
        raise ValueError(f"{arg} must be one of {sorted(VERIFIERS)}, got {verifier!r}")
    return verifier


def format_ok(task: Task, response: str) -> bool:
    """The response states a non-empty answer terminated by END_MARKER (numeric tasks: a number).

    Anything after the marker is ignored: a sampler that does not stop there is not penalised.
    """
    if END_MARKER not in response:
        return False
    predicted = extract_answer(response)
    if not predicted:
        return False
    return task.verifier != "numeric" or parse_number(predicted) is not None


def score(task: Task, response: str) -> dict:
    """{'reward': correctness in {0, 1}, 'format': format reward in {0, 1}, 'correct': bool}."""
    predicted = extract_answer(response)
    check = VERIFIERS[task.verifier]
    correct = any(check(predicted, a) for a in task.answers)
    return {"reward": float(correct), "format": float(format_ok(task, response)), "correct": correct}


def demonstration(task: Task) -> tuple[str, str]:
    """(prompt, target) for SFT: the loss covers only the target, the answer plus END_MARKER.

    The target starts with a space unless the prompt already ends in whitespace.
    """
    sep = "" if not task.prompt or task.prompt[-1].isspace() else " "
    return task.prompt, sep + task.answer + END_MARKER


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------

def in_held_out(key: str, seed: int, fraction: float) -> bool:
    """Whether problem `key` is held out: a seeded hash, stable across processes and platforms."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64 < fraction


def _check_split(split: str, held_out_fraction: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")


# ---------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------

_OPS = {"+": ("addition", lambda a, b: a + b), "-": ("subtraction", lambda a, b: a - b)}


def carry_trace(a: int, op: str, b: int) -> str:
    """A column-by-column worked solution of `a op b` (non-negative operands, a >= b for '-')."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    if a < 0 or b < 0 or (op == "-" and a < b):
        raise ValueError(f"carry_trace needs non-negative operands (a >= b for '-'), got {a}{op}{b}")
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        if op == "+":
            total = x + y + carry
            lhs = f"{x}+{y}" + (f"+{carry}" if carry else "")
            digit, carry = total % 10, total // 10
            steps.append(f"{lhs}={total}, write {digit}" + (f" carry {carry}" if carry else ""))
        else:
            total = x - y - carry
            lhs = f"{x}-{y}" + (f"-{carry}" if carry else "")
            carry = 1 if total < 0 else 0
            digit = total + 10 * carry
            steps.append(f"{lhs}={total}" + (f", borrow 1: {digit}" if carry else "") + f", write {digit}")
    if carry:  # addition only: subtraction with a >= b never borrows past the top column
        steps.append(f"write {carry}")
    return "; ".join(steps) + f". So {a}{op}{b}={_OPS[op][1](a, b)}"


def _operand(rng: random.Random, digits: int) -> int:
    """A uniform integer with exactly `digits` digits (0-9 for one digit)."""
    return rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def arithmetic_tasks(n: int, split: str = "train", seed: int = 0, min_digits: int = 1, max_digits: int = 3,
                     ops: Sequence[str] = ("+", "-"), held_out_fraction: float = 0.2, unique: bool = True,
                     ) -> list[Task]:
    """`n` addition/subtraction problems "Q: 347+58=? A:" of the given split, deterministic in `seed`.

    Difficulty d (uniform in [min_digits, max_digits]) is the digit count of the longer operand: the
    first has d digits, the second 1..d; subtraction puts the larger first, so results are >= 0.
    A problem is held out by a seeded hash of its operands and operator alone, so the splits never
    share a problem whatever the digit range. unique: no problem twice (an error if the split runs out).
    """
    _check_split(split, held_out_fraction)
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got min_digits={min_digits}, "
                         f"max_digits={max_digits}")
    ops = list(ops)
    if not ops or any(op not in _OPS for op in ops):
        raise ValueError(f"ops must be a non-empty subset of {sorted(_OPS)}, got {ops}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"arithmetic:{seed}:{split}")
    want_held_out = split == "held_out"
    tasks, seen = [], set()
    attempts = 0
    while len(tasks) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(f"found only {len(tasks)} of n={n} {'unique ' if unique else ''}{split} problems "
                             f"with {min_digits}-{max_digits} digits and ops {ops}; widen the digit range "
                             f"or lower n")
        d = rng.randint(min_digits, max_digits)
        op = rng.choice(ops)
        a, b = _operand(rng, d), _operand(rng, rng.randint(1, d))
        if op == "-" and b > a:
            a, b = b, a
        key = f"{a}{op}{b}"
        if in_held_out(key, seed, held_out_fraction) != want_held_out or (unique and key in seen):
            continue
        seen.add(key)
        name, fn = _OPS[op]
        tasks.append(Task(prompt=f"Q: {key}=? A:", answer=str(fn(a, b)), name=name, difficulty=d,
                          verifier="numeric", solution=carry_trace(a, op, b),
                          meta={"a": a, "b": b, "op": op, "split": split}))
    return tasks


# ---------------------------------------------------------------------------
# Knowledge questions from the biography graph
# ---------------------------------------------------------------------------

# relation -> question templates ({name}: the person in full; {kin}: mother/father/sister/brother).
# "birth_country" composes two facts (born in a city, the city lies in a country): difficulty 2.
QUESTION_TEMPLATES: dict[str, list[str]] = {
    "birth_date": ["When was {name} born?", "What is {name}'s date of birth?"],
    "birth_city": ["Where was {name} born?", "In which city was {name} born?", "What is {name}'s hometown?"],
    "birth_country": ["In which country was {name} born?", "Which country is {name} from?"],
    "university": ["Where did {name} study?", "Which university did {name} attend?"],
    "field": ["What did {name} major in?", "What was {name}'s field of study?"],
    "employer": ["Who does {name} work for?", "Which company employs {name}?"],
    "job_title": ["What is {name}'s job?", "What does {name} do for a living?"],
    "hobby": ["What is a hobby of {name}?", "What does {name} enjoy in their free time?"],
    "parent": ["Who is {name}'s {kin}?", "What is the name of {name}'s {kin}?"],
    "sibling": ["Who is {name}'s {kin}?", "What is the name of {name}'s {kin}?"],
    "mentor": ["Who mentored {name}?", "Who was {name}'s mentor?"],
}

_HELD_OUT_MODES = ("templates", "people")


def _fact_sentence(name: str, relation: str, slots: dict) -> Optional[str]:
    """The fact as the biographies state it, subject named in full (first template without pronouns)."""
    subj = {"S": name, "s": name, "Sp": name + "'s", "sp": name + "'s"}
    for template in TEMPLATES[relation]:
        try:
            return template.format(**subj, **slots)
        except KeyError:  # the template needs a pronoun
            continue
    return None


def knowledge_tasks(bios: BiographyCorpus, split: str = "train", held_out: str = "templates", seed: int = 0,
                    held_out_fraction: float = 0.2, held_out_template: int = -1,
                    relations: Optional[Sequence[str]] = None) -> list[Task]:
    """Questions "Q: Where was X born? A:" about every person of `bios`, answered from the graph.

    held_out: "templates" (both splits ask about every person; held-out asks with template index
    `held_out_template` of each relation, train with the others) or "people" (a seeded hash of the
    name holds out `held_out_fraction` of the people; both splits use every template).
    relations: keys of QUESTION_TEMPLATES (None: all). A question with several true objects (two
    hobbies, two brothers) is asked once, any of them accepted. Shuffled by `seed`.
    """
    _check_split(split, held_out_fraction)
    if held_out not in _HELD_OUT_MODES:
        raise ValueError(f"held_out must be one of {list(_HELD_OUT_MODES)}, got {held_out!r}")
    relations = list(QUESTION_TEMPLATES) if relations is None else list(relations)
    unknown = [r for r in relations if r not in QUESTION_TEMPLATES]
    if unknown or not relations:
        raise ValueError(f"relations must be a non-empty subset of {sorted(QUESTION_TEMPLATES)}, got {relations}")
    if not bios.people:
        raise ValueError("bios has no people (bios.people is empty)")
    shortest = min(len(QUESTION_TEMPLATES[r]) for r in relations)
    if isinstance(held_out_template, bool) or not -shortest <= held_out_template < shortest:
        raise ValueError(f"held_out_template must be in [{-shortest}, {shortest - 1}] (every relation has "
                         f"{shortest} or more templates), got {held_out_template!r}")

    by_name = {p["name"]: p for p in bios.people}
    tasks = []
    for person in bios.people:
        name = person["name"]
        if held_out == "people" and in_held_out(name, seed, held_out_fraction) != (split == "held_out"):
            continue
        # question key (relation, kin) -> [(object, slots, relation of the stated fact)]
        questions: dict[tuple[str, str], list] = {}
        for relation, slots, (_, _, obj) in person_facts(person, by_name, bios.world):
            questions.setdefault((relation, slots.get("kin", "")), []).append((obj, slots, relation))
            if relation == "birth_city":  # two hops: the city, then its country
                questions.setdefault(("birth_country", ""), []).append((slots["country"], slots, relation))
        for (relation, kin), found in questions.items():
            if relation not in relations:
                continue
            templates = QUESTION_TEMPLATES[relation]
            held = range(len(templates))[held_out_template]
            if held_out == "templates":
                chosen = [held] if split == "held_out" else [t for t in range(len(templates)) if t != held]
            else:
                chosen = range(len(templates))
            answer, slots, fact_relation = found[0]
            for t in chosen:
                tasks.append(Task(
                    prompt=f"Q: {templates[t].format(name=name, kin=kin)} A:", answer=answer,
                    name=f"knowledge/{relation}", difficulty=2 if relation == "birth_country" else 1,
                    verifier="exact", solution=_fact_sentence(name, fact_relation, slots),
                    accepted=tuple(o for o, _, _ in found[1:]),
                    meta={"subject": name, "relation": relation, "template": t, "split": split}))
    random.Random(f"knowledge:{seed}:{split}").shuffle(tasks)
    return tasks


# ---------------------------------------------------------------------------
# Tasks from a JSONL file
# ---------------------------------------------------------------------------

def load_jsonl_tasks(path: str | os.PathLike, verifier: str = "exact", name: Optional[str] = None) -> list[Task]:
    """Tasks from a JSONL file, one {"prompt": str, "answer": str or number} object a line.

    Optional keys: "difficulty" (int >= 0, default 0), "solution" (str). Blank lines are skipped.
    A malformed line is a ValueError naming the file and its 1-based line number.
    name: the task name (default: the file's stem).
    """
    _check_verifier(verifier)
    name = name if name is not None else os.path.splitext(os.path.basename(os.fspath(path)))[0]
    tasks = []
    for lineno, row in iter_jsonl(path):
        at = where(path, lineno)
        for key in ("prompt", "answer"):
            if key not in row:
                raise ValueError(f"{at}: missing key {key!r}")
        prompt, answer = row["prompt"], row["answer"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{at}: 'prompt' must be a non-empty string, got {prompt!r}")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise ValueError(f"{at}: 'answer' must be a string or a number, got {answer!r}")
        difficulty = row.get("difficulty", 0)
        solution = row.get("solution")
        if isinstance(difficulty, bool) or not isinstance(difficulty, int) or difficulty < 0:
            raise ValueError(f"{at}: 'difficulty' must be an int >= 0, got {difficulty!r}")
        if solution is not None and not isinstance(solution, str):
            raise ValueError(f"{at}: 'solution' must be a string, got {solution!r}")
        try:
            tasks.append(Task(prompt=prompt, answer=answer, name=name, difficulty=difficulty,
                              verifier=verifier, solution=solution, meta={"source": at}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{at}: {e}") from None
    if not tasks:
        raise ValueError(f"{os.fspath(path)}: no tasks (the file is empty)")
    return tasks
