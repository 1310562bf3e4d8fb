import random
import re
import time

import pytest

from datamodules.synthetic_bios import BiographyCorpus, _unique_names, generate_biographies

PERSON_RELATIONS = {"birth_date", "birth_city", "university", "field", "employer", "job_title",
                    "hobby", "parent", "sibling", "mentor"}
ENTITY_RELATIONS = {"country", "located_in", "industry", "headquartered_in"}


@pytest.fixture(scope="module")
def corpus() -> BiographyCorpus:
    return generate_biographies(num_people=400, seed=0)


def test_same_seed_is_identical_other_seed_differs(corpus):
    again = generate_biographies(num_people=400, seed=0)
    assert again.documents == corpus.documents
    assert again.triples == corpus.triples
    assert again.people == corpus.people
    other = generate_biographies(num_people=400, seed=1)
    assert other.documents != corpus.documents
    assert other.triples != corpus.triples


def test_one_document_per_person_with_unique_names(corpus):
    assert len(corpus.documents) == len(corpus.people) == 400
    names = [p["name"] for p in corpus.people]
    assert len(set(names)) == len(names)
    assert all(p["gender"] in ("female", "male") for p in corpus.people)


def test_every_person_fact_is_stated_in_the_subjects_document(corpus):
    doc_of = {p["name"]: doc for p, doc in zip(corpus.people, corpus.documents)}
    person_triples = [t for t in corpus.triples if t[0] in doc_of]
    assert {r for _, r, _ in person_triples} == PERSON_RELATIONS
    for subject, relation, obj in person_triples:
        assert obj in doc_of[subject], (subject, relation, obj)


def test_entity_facts_cooccur_in_some_document(corpus):
    doc_of = {p["name"] for p in corpus.people}
    entity_triples = [t for t in corpus.triples if t[0] not in doc_of]
    assert {r for _, r, _ in entity_triples} == ENTITY_RELATIONS
    assert len(set(entity_triples)) == len(entity_triples)
    for subject, relation, obj in entity_triples:
        assert any(subject in d and obj in d for d in corpus.documents), (subject, relation, obj)
    # Facts about one entity are consistent: a city has exactly one country, etc.
    seen = {}
    for subject, relation, obj in entity_triples:
        assert seen.setdefault((subject, relation), obj) == obj


def test_people_attributes_match_triples(corpus):
    by_subject = {}
    for s, r, o in corpus.triples:
        by_subject.setdefault((s, r), []).append(o)
    for p in corpus.people[:50]:
        assert by_subject[(p["name"], "birth_date")] == [p["birth_date"]]
        assert by_subject[(p["name"], "employer")] == [p["employer"]]
        assert sorted(by_subject.get((p["name"], "parent"), [])) == sorted(p["parents"])
        assert by_subject.get((p["name"], "mentor"), [None]) == [p["mentor"]]


def test_siblings_are_symmetric(corpus):
    sibs = {(s, o) for s, r, o in corpus.triples if r == "sibling"}
    assert sibs, "expected some sibling relations"
    assert all((o, s) in sibs for s, o in sibs)


def test_first_sentence_names_the_person_and_order_varies(corpus):
    first_kinds = set()
    for p, doc in zip(corpus.people, corpus.documents):
        first = re.split(r"(?<=\.) ", doc)[0]
        assert p["name"] in first
        first_kinds.add("born on" in first)
    assert first_kinds == {True, False}


def test_templates_vary_and_pronouns_follow_gender(corpus):
    text = "\n".join(corpus.documents)
    for phrasing in ("was born on", "date of birth is", "came into the world on", "Records show that"):
        assert phrasing in text
    wrong = {"female": re.compile(r"\b(he|his|him)\b", re.I), "male": re.compile(r"\b(she|her|hers)\b", re.I)}
    for p, doc in zip(corpus.people, corpus.documents):
        assert not wrong[p["gender"]].search(doc), doc


def test_size_and_speed():
    start = time.perf_counter()
    big = generate_biographies(num_people=3000, seed=0)
    elapsed = time.perf_counter() - start
    assert sum(len(d) for d in big.documents) > 800_000
    assert elapsed < 2.0


def test_name_space_extends_with_middle_initials():
    names = _unique_names(random.Random(0), 20_000)
    full = [f"{f} {l}" for f, l, _ in names]
    assert len(set(full)) == 20_000
    assert any("." in f for f, _, _ in names)


def test_invalid_num_people():
    with pytest.raises(ValueError, match="num_people"):
        generate_biographies(num_people=0)


def test_renderings_augment_each_person_and_keep_the_first_corpus(corpus):
    aug = generate_biographies(num_people=400, seed=0, renderings=3)
    assert aug.documents[:400] == corpus.documents and aug.triples == corpus.triples and aug.renderings == 3
    assert len(aug.documents) == 1200 and aug.person_of(0) == aug.person_of(400) == aug.person_of(800) == 0
    for i in (0, 57, 399):
        versions = [aug.documents[i + r * 400] for r in range(3)]
        assert len(set(versions)) == 3  # another order, templates and references each time
        name = aug.people[i]["name"]
        assert all(name in v for v in versions)
        # the same facts: each rendering names the person's birth city and employer
        for v in versions:
            assert aug.people[i]["birth_city"] in v and aug.people[i]["employer"] in v
    assert generate_biographies(num_people=400, seed=0, renderings=3).documents == aug.documents
    with pytest.raises(ValueError, match="renderings must be an integer >= 1"):
        generate_biographies(num_people=10, renderings=0)


def test_full_names_name_the_person_in_every_sentence():
    bios = generate_biographies(num_people=30, seed=0, full_names=True)
    for person, doc in zip(bios.people, bios.documents):
        sentences = [s for s in re.split(r"(?<=\.) (?=[A-Z])", doc) if s]
        # a sentence stating a kin relation may name the relative first ("X is her mother.")
        named = [s for s in sentences if person["name"] in s]
        assert len(named) >= len(sentences) - 3 and len(named) >= 5
        assert not re.search(r"\b(He|She|They)\b", doc.split(person["name"], 1)[1].split(".")[0])
    assert bios.documents != generate_biographies(num_people=30, seed=0).documents
