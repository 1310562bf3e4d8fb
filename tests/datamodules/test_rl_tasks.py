import json
import re

import pytest

from datamodules.rl_tasks import (END_MARKER, QUESTION_TEMPLATES, Task, arithmetic_tasks, carry_trace, demonstration,
                                  extract_answer, knowledge_tasks, load_jsonl_tasks, score)
from datamodules.synthetic_bios import generate_biographies, person_facts


@pytest.fixture(scope="module")
def bios():
    return generate_biographies(num_people=60, seed=3)


def _operands(prompt):
    m = re.fullmatch(r"Q: (\d+)([+-])(\d+)=\? A:", prompt)
    assert m, prompt
    return m.group(1), m.group(2), m.group(3)


# --- arithmetic ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_arithmetic_answers_are_correct_and_difficulty_respected(seed):
    tasks = arithmetic_tasks(60, seed=seed, min_digits=2, max_digits=5)
    assert len(tasks) == 60 and len({t.prompt for t in tasks}) == 60
    for t in tasks:
        a, op, b = _operands(t.prompt)
        assert t.answer == str(eval(f"{a}{op}{b}"))
        assert int(t.answer) >= 0
        assert t.difficulty == max(len(a), len(b)) and 2 <= t.difficulty <= 5
        assert t.name == {"+": "addition", "-": "subtraction"}[op]
        assert t.solution.endswith(f"So {a}{op}{b}={t.answer}")
        assert score(t, f" {t.answer}\n")["correct"]
    assert {t.difficulty for t in tasks} == {2, 3, 4, 5}
    assert {t.name for t in tasks} == {"addition", "subtraction"}


def test_arithmetic_is_deterministic_and_ops_configurable():
    assert arithmetic_tasks(30, seed=5) == arithmetic_tasks(30, seed=5)
    assert arithmetic_tasks(30, seed=5) != arithmetic_tasks(30, seed=6)
    assert {t.name for t in arithmetic_tasks(30, ops=["-"])} == {"subtraction"}
    assert {t.difficulty for t in arithmetic_tasks(30, min_digits=3, max_digits=3)} == {3}


def test_carry_trace_digits_spell_the_answer():
    for a, op, b in [(347, "+", 58), (999, "+", 1), (1000, "-", 1), (503, "-", 78), (7, "-", 7)]:
        trace = carry_trace(a, op, b)
        written = re.findall(r"write (\d)", trace)
        assert int("".join(reversed(written))) == eval(f"{a}{op}{b}")
    assert "carry 1" in carry_trace(347, "+", 58) and "borrow 1" in carry_trace(503, "-", 78)
    with pytest.raises(ValueError, match="a >= b"):
        carry_trace(3, "-", 5)


def test_arithmetic_split_has_no_overlap_and_is_deterministic():
    train = arithmetic_tasks(300, "train", seed=1, max_digits=2)
    held = arithmetic_tasks(100, "held_out", seed=1, max_digits=2)
    assert not {t.prompt for t in train} & {t.prompt for t in held}
    # The split depends on the problem, not on the digit range asked for.
    held_wide = arithmetic_tasks(300, "held_out", seed=1, min_digits=1, max_digits=3)
    assert not {t.prompt for t in train} & {t.prompt for t in held_wide}
    assert held == arithmetic_tasks(100, "held_out", seed=1, max_digits=2)
    other = {t.prompt for t in arithmetic_tasks(100, "held_out", seed=2, max_digits=2)}
    assert other != {t.prompt for t in held}


def test_arithmetic_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="split"):
        arithmetic_tasks(3, split="test")
    with pytest.raises(ValueError, match="ops"):
        arithmetic_tasks(3, ops=["*"])
    with pytest.raises(ValueError, match="min_digits"):
        arithmetic_tasks(3, min_digits=3, max_digits=2)
    with pytest.raises(ValueError, match="held_out_fraction"):
        arithmetic_tasks(3, held_out_fraction=0.0)
    with pytest.raises(ValueError, match="widen the digit range"):  # one digit, '+': 100 problems
        arithmetic_tasks(150, max_digits=1, ops=["+"])


# --- knowledge ----------------------------------------------------------------------------------

def _truth(bios):
    """(subject, relation, kin) -> set of true objects, from person_facts."""
    by_name = {p["name"]: p for p in bios.people}
    truth = {}
    for p in bios.people:
        for relation, slots, (s, _, o) in person_facts(p, by_name, bios.world):
            truth.setdefault((s, relation, slots.get("kin", "")), set()).add(o)
            if relation == "birth_city":
                truth.setdefault((s, "birth_country", ""), set()).add(bios.world["city_country"][o])
    return truth


def _template_regex(template):
    parts = re.split(r"\{\w+\}", template)
    return re.compile("Q: " + "(.+)".join(map(re.escape, parts)) + " A:")


def test_knowledge_answers_match_the_graph(bios):
    truth = _truth(bios)
    tasks = knowledge_tasks(bios) + knowledge_tasks(bios, "held_out")
    assert {t.name for t in tasks} == {f"knowledge/{r}" for r in QUESTION_TEMPLATES}
    seen = set()
    for t in tasks:
        rel, subject = t.meta["relation"], t.meta["subject"]
        kin = next((k for k in ("mother", "father", "sister", "brother") if f"'s {k}?" in t.prompt), "")
        expected = truth[(subject, rel, kin)]
        assert set(t.answers) == expected, t
        assert subject in t.prompt and t.prompt.startswith("Q: ") and t.prompt.endswith(" A:")
        assert t.difficulty == (2 if rel == "birth_country" else 1)
        assert score(t, f" {t.answer}\n")["correct"]
        seen.add((subject, rel, kin))
    assert seen == set(truth)  # every fact is asked about
    multi = [t for t in tasks if t.accepted]
    assert multi and all(score(t, t.accepted[0] + "\n")["correct"] for t in multi)


def test_held_out_templates_never_appear_in_train(bios):
    train = knowledge_tasks(bios, "train", held_out="templates")
    held = knowledge_tasks(bios, "held_out", held_out="templates")
    held_regexes = [_template_regex(ts[-1]) for ts in QUESTION_TEMPLATES.values()]
    train_regexes = [_template_regex(t) for ts in QUESTION_TEMPLATES.values() for t in ts[:-1]]
    assert not any(r.fullmatch(t.prompt) for t in train for r in held_regexes)
    assert all(any(r.fullmatch(t.prompt) for r in held_regexes) for t in held)
    assert all(any(r.fullmatch(t.prompt) for r in train_regexes) for t in train)
    assert not {t.prompt for t in train} & {t.prompt for t in held}
    # Template hold-out asks about the same people in both splits.
    assert {t.meta["subject"] for t in train} == {t.meta["subject"] for t in held}


def test_held_out_people_split_is_disjoint_and_deterministic(bios):
    train = knowledge_tasks(bios, "train", held_out="people", seed=4)
    held = knowledge_tasks(bios, "held_out", held_out="people", seed=4)
    train_people, held_people = {t.meta["subject"] for t in train}, {t.meta["subject"] for t in held}
    assert train_people and held_people and not train_people & held_people
    assert train_people | held_people == {p["name"] for p in bios.people}
    assert not {t.prompt for t in train} & {t.prompt for t in held}
    assert knowledge_tasks(bios, "held_out", held_out="people", seed=4) == held
    assert {t.meta["subject"] for t in knowledge_tasks(bios, "held_out", held_out="people", seed=5)} != held_people


def test_knowledge_bad_arguments(bios):
    with pytest.raises(ValueError, match="held_out must be"):
        knowledge_tasks(bios, held_out="names")
    with pytest.raises(ValueError, match="relations"):
        knowledge_tasks(bios, relations=["favourite_colour"])
    with pytest.raises(ValueError, match="held_out_template"):
        knowledge_tasks(bios, held_out_template=2)
    only = knowledge_tasks(bios, relations=["mentor"])
    assert only and {t.name for t in only} == {"knowledge/mentor"}


# --- verifiers and rewards ----------------------------------------------------------------------

def test_extract_answer():
    assert extract_answer(" 405\nQ: 1+1=? A: 2") == "405"
    assert extract_answer("  Valmora  ") == "Valmora"
    assert extract_answer("\n405") == ""


def test_exact_verifier_hand_cases():
    t = Task(prompt="Q: Where was Ada Lind born? A:", answer="Pelham Bay", name="k", difficulty=1)
    assert score(t, " Pelham Bay\n") == {"reward": 1.0, "format": 1.0, "correct": True}
    assert score(t, "Pelham  Bay\nmore text after the marker") == {"reward": 1.0, "format": 1.0, "correct": True}
    assert score(t, " Corvell\n") == {"reward": 0.0, "format": 1.0, "correct": False}  # right format, wrong
    assert score(t, " Pelham Bay") == {"reward": 1.0, "format": 0.0, "correct": True}  # right, no end marker
    assert score(t, " Pelham Bay, I think\n")["correct"] is False  # extra text
    assert score(t, " pelham bay\n")["correct"] is False  # case matters
    assert score(t, "\nPelham Bay\n") == {"reward": 0.0, "format": 0.0, "correct": False}  # empty answer
    assert score(t, "") == {"reward": 0.0, "format": 0.0, "correct": False}


def test_numeric_verifier_hand_cases():
    t = Task(prompt="Q: 347+58=? A:", answer="405", name="addition", difficulty=3, verifier="numeric")
    assert score(t, " 405\n") == {"reward": 1.0, "format": 1.0, "correct": True}
    assert score(t, " 405.0\n")["correct"] and score(t, "+405.0000000001\n")["correct"]
    assert not score(t, " 405.1\n")["correct"] and not score(t, " 404\n")["correct"]
    assert score(t, " 406\n") == {"reward": 0.0, "format": 1.0, "correct": False}
    assert score(t, " 405 is the answer\n") == {"reward": 0.0, "format": 0.0, "correct": False}
    assert score(t, " four hundred five\n") == {"reward": 0.0, "format": 0.0, "correct": False}
    assert score(t, " nan\n")["format"] == 0.0 and score(t, " inf\n")["format"] == 0.0
    assert score(t, " 405") == {"reward": 1.0, "format": 0.0, "correct": True}
    f = Task(prompt="Q: 1/4? A:", answer="0.25", name="frac", difficulty=1, verifier="numeric")
    assert score(f, " .25\n")["correct"] and score(f, " 2.5e-1\n")["correct"]
    # The exact verifier would not accept "405.0".
    exact = Task(prompt=t.prompt, answer="405", name="addition", difficulty=3, verifier="exact")
    assert not score(exact, " 405.0\n")["correct"] and score(exact, " 405.0\n")["format"] == 1.0


def test_task_validation():
    with pytest.raises(ValueError, match="verifier"):
        Task(prompt="p", answer="a", name="n", difficulty=0, verifier="fuzzy")
    with pytest.raises(ValueError, match="end marker"):
        Task(prompt="p", answer="a\nb", name="n", difficulty=0)
    with pytest.raises(ValueError, match="not a number"):
        Task(prompt="p", answer="abc", name="n", difficulty=0, verifier="numeric")
    with pytest.raises(TypeError, match="prompt"):
        Task(prompt=3, answer="a", name="n", difficulty=0)


# --- demonstrations -----------------------------------------------------------------------------

def test_demonstrations_cover_only_answer_and_marker(bios):
    t = arithmetic_tasks(1, seed=0)[0]
    prompt, target = demonstration(t)
    assert prompt == t.prompt and target == f" {t.answer}{END_MARKER}"
    assert score(t, target) == {"reward": 1.0, "format": 1.0, "correct": True}
    k = knowledge_tasks(bios)[0]
    assert demonstration(k) == (k.prompt, " " + k.answer + "\n")
    spaced = Task(prompt="Answer: ", answer="7", name="n", difficulty=0)
    assert demonstration(spaced) == ("Answer: ", "7\n")


# --- JSONL --------------------------------------------------------------------------------------

def test_load_jsonl_tasks(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [{"prompt": "Q: 2+2? A:", "answer": "4", "difficulty": 1},
            {"prompt": "Q: half of 5? A:", "answer": 2.5, "solution": "5/2=2.5"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    tasks = load_jsonl_tasks(path, verifier="numeric")
    assert [t.answer for t in tasks] == ["4", "2.5"] and [t.difficulty for t in tasks] == [1, 0]
    assert tasks[1].solution == "5/2=2.5" and {t.name for t in tasks} == {"gsm"}
    assert score(tasks[1], " 2.50\n")["correct"]
    assert load_jsonl_tasks(path)[0].verifier == "exact"


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "Q: x? A:", "answer": "1"', "invalid JSON"),
    ('{"prompt": "Q: x? A:"}', "missing key 'answer'"),
    ('{"answer": "1"}', "missing key 'prompt'"),
    ('{"prompt": 5, "answer": "1"}', "'prompt' must be a non-empty string"),
    ('["Q: x? A:", "1"]', "expected a JSON object"),
    ('{"prompt": "Q: x? A:", "answer": null}', "'answer' must be a string or a number"),
    ('{"prompt": "Q: x? A:", "answer": "a\\nb"}', "end marker"),
    ('{"prompt": "Q: x? A:", "answer": "1", "difficulty": -1}', "difficulty"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "tasks.jsonl"
    good = json.dumps({"prompt": "Q: ok? A:", "answer": "1"})
    path.write_text(f"{good}\n\n{bad_line}\n{good}\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3") + ".*" + re.escape(message)):
        load_jsonl_tasks(path)


def test_jsonl_numeric_answer_and_verifier_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "Q: x? A:", "answer": "seven"}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1") + ".*not a number"):
        load_jsonl_tasks(path, verifier="numeric")
    with pytest.raises(ValueError, match="verifier must be one of .*'fuzzy'"):
        load_jsonl_tasks(path, verifier="fuzzy")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no tasks"):
        load_jsonl_tasks(empty)
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(json.dumps({"prompt": "a", "answer": "b"}).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match=re.escape(f"{binary}:2") + ".*UTF-8"):
        load_jsonl_tasks(binary)
