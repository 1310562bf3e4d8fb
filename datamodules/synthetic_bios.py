"""Deterministic synthetic biography corpus built from a seeded knowledge graph.

The corpus is the default training data: it needs no network, is tiny enough to
train on a laptop, and every stated fact is also emitted as a (subject, relation,
object) triple so knowledge probes can check what a model has learned.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
import random
from typing import Optional, Sequence

__all__ = ["BiographyCorpus", "TEMPLATES", "check_templates", "fact_cloze_probes", "generate_biographies",
           "person_facts", "render_facts"]


@dataclass
class BiographyCorpus:
    """Biographies plus the facts they state."""

    documents: list[str]
    triples: list[tuple[str, str, str]]
    people: list[dict] = field(default_factory=list)
    world: dict = field(default_factory=dict)  # city -> country, universities, companies
    renderings: int = 1  # documents per person: document i is about person i % len(people)

    def person_of(self, doc: int) -> int:
        """Index into `people` of the person document `doc` is about."""
        return doc % len(self.people)


# ---------------------------------------------------------------------------
# Vocabulary of the fictional world. Only `random.Random(seed)` draws from these
# lists, in a fixed order, so the corpus is identical on every platform.
# ---------------------------------------------------------------------------

_FEMALE_FIRST = [
    "Adela", "Brielle", "Cassia", "Dalia", "Elowen", "Fenna", "Giselle", "Hedda", "Ilse", "Jorun",
    "Kalina", "Liora", "Maren", "Nerys", "Odile", "Perrine", "Quilla", "Rosalind", "Saskia", "Tamsin",
    "Ulrika", "Vesna", "Wilhelmina", "Xanthe", "Ysolde", "Zinnia", "Anouk", "Brenna", "Clementine",
    "Delphine", "Esmee", "Freya", "Greta", "Hallie", "Imogen", "Juniper", "Katya", "Linnea", "Mirela",
    "Noor", "Orla", "Petra", "Rhian", "Solveig", "Thea", "Una", "Vivienne", "Wren", "Yara", "Zelda",
    "Annika", "Beatrix", "Coralie", "Dagny", "Eira", "Flavia", "Ginevra", "Honora", "Isaura", "Jessamy",
]

_MALE_FIRST = [
    "Alaric", "Bastien", "Cyprian", "Dorian", "Emrys", "Florian", "Gideon", "Hadrian", "Ivo", "Jasper",
    "Kaspar", "Leander", "Matthias", "Nikolai", "Osric", "Piers", "Quentin", "Rasmus", "Soren", "Tobias",
    "Ulric", "Valentin", "Wendell", "Xavier", "Yorick", "Zephyr", "Ambrose", "Benedikt", "Casimir",
    "Desmond", "Evander", "Fabian", "Gustav", "Henrik", "Ignatius", "Joaquin", "Konrad", "Lucian",
    "Magnus", "Nestor", "Oswin", "Pascal", "Reinhold", "Silas", "Thaddeus", "Urban", "Viggo", "Wolfram",
    "Yannick", "Zoltan", "Anselm", "Bertrand", "Corin", "Dietrich", "Elias", "Fergus", "Griffin",
    "Horatio", "Isidor", "Jarek",
]

_LAST = [
    "Abernathy", "Blackwood", "Castellan", "Delacroix", "Eastwick", "Fairbanks", "Gallagher", "Halloran",
    "Ingersoll", "Jablonski", "Kowalczyk", "Lindqvist", "Marchetti", "Nakashima", "Oyelaran", "Pembrook",
    "Quintero", "Rasmussen", "Sandoval", "Thorvaldsen", "Underhill", "Valdivia", "Whitcombe", "Yamamura",
    "Zabrowski", "Arkwright", "Bellamy", "Cartwright", "Drummond", "Ellingsen", "Ferreira", "Grimaldi",
    "Hargreaves", "Iwasaki", "Jourdain", "Kingsley", "Lachance", "Montague", "Novak", "Okonkwo",
    "Pellegrini", "Ravensworth", "Stavros", "Trevelyan", "Umberfield", "Vasquez", "Winterbourne",
    "Achterberg", "Brannigan", "Coldwell", "Dunleavy", "Esterhazy", "Fitzgerald", "Gundersen", "Holloway",
    "Ishikawa", "Jovanovic", "Kerrigan", "Lundgren", "Mortimer", "Nightingale", "Oduya", "Penhaligon",
    "Quarrington", "Rosenthal", "Szabo", "Tennyson", "Uchida", "Vandermeer", "Wolstenholme", "Yardley",
    "Zimmerman", "Ashdown", "Beaumont", "Crowther", "Darrow", "Everly", "Fontaine", "Galloway", "Hawthorne",
    "Inglewood", "Jansen", "Kovacs", "Lockhart", "Merriweather", "Northcott", "Ostrowski", "Prendergast",
    "Radcliffe", "Sinclair", "Thornbury", "Vance", "Whitfield", "Ashford", "Brightwater", "Calloway",
    "Dunmore", "Ellsworth", "Fairweather", "Greenhalgh", "Huxley", "Ivanova", "Kilbride", "Larkspur",
    "Mayfield", "Norwood", "Pemberton", "Rowntree", "Stanhope", "Tolliver", "Wexford", "Aldridge",
    "Bramwell", "Chadwick", "Delaney", "Emberton", "Farrington", "Goodwin", "Hollister", "Ravenscroft",
]

_COUNTRIES = [
    "Estrenia", "Valdoria", "Korvath", "Lumeria", "Oshkara", "Pellandia",
    "Quessia", "Rhovana", "Sardenne", "Tavaris", "Ulmstead", "Wyncastle",
]

_CITIES = [
    "Valmora", "Brighthaven", "Corvell", "Dunmarsh", "Eldergate", "Fallowmere", "Glassford", "Hollowpine",
    "Ironmouth", "Jadeport", "Kestrelton", "Larkmoor", "Marrowdale", "Northmere", "Oakhollow", "Pelham Bay",
    "Quarrystone", "Redhaven", "Saltmarsh", "Thornwick", "Umberlee", "Vintner's Cross", "Westerholt",
    "Yewbridge", "Ashcombe", "Blue Harbor", "Cinderfell", "Driftmoor", "Emberlyn", "Frostvale",
    "Greywater", "Highcliff", "Isleworth", "Juniper Falls", "Kingsreach", "Lowbarrow", "Millbrook",
    "Nettlefield", "Orchard Point", "Port Solace", "Ravensgate", "Silverbrook", "Tidewell", "Upper Fenwick",
    "Verdant Hollow", "Windmere", "Zephyr Heights", "Amberfield",
]

_NAMED_UNIVERSITIES = [
    "Halvorsen Institute of Technology", "Saint Aldric College", "Royal Academy of Sciences",
    "Marigold University", "Whitestone Polytechnic", "Northern Lights University",
    "Calder School of Economics", "Thessaly College of the Arts", "Greymantle University",
    "Obsidian Institute", "Ambermoor University", "Lindenhall College",
]

# Industry -> (company name suffixes, job titles typical for the industry).
_INDUSTRIES: dict[str, tuple[list[str], list[str]]] = {
    "software": (["Software", "Systems", "Labs"],
                 ["software engineer", "product manager", "data scientist", "site reliability engineer"]),
    "biotechnology": (["Biosciences", "Therapeutics", "Genomics"],
                      ["research scientist", "lab technician", "clinical data manager"]),
    "banking": (["Bank", "Capital", "Financial"], ["financial analyst", "loan officer", "risk manager"]),
    "aerospace": (["Aerospace", "Aeronautics", "Avionics"],
                  ["propulsion engineer", "test pilot", "flight systems engineer"]),
    "retail": (["Stores", "Market", "Outfitters"], ["store manager", "merchandiser", "buyer"]),
    "energy": (["Energy", "Power", "Renewables"], ["grid engineer", "field technician", "energy analyst"]),
    "media": (["Media", "Studios", "Press"], ["editor", "journalist", "producer"]),
    "logistics": (["Logistics", "Freight", "Shipping"],
                  ["operations manager", "fleet coordinator", "supply chain analyst"]),
    "food": (["Foods", "Kitchens", "Provisions"], ["food scientist", "quality inspector", "head chef"]),
    "construction": (["Builders", "Construction", "Engineering"],
                     ["architect", "civil engineer", "site foreman"]),
    "healthcare": (["Health", "Clinics", "Medical"], ["nurse", "physician", "hospital administrator"]),
    "consulting": (["Consulting", "Partners", "Advisory"],
                   ["management consultant", "strategy analyst", "engagement manager"]),
}

_COMPANY_PREFIXES = [
    "Aster", "Borealis", "Cobalt", "Dunmore", "Evergreen", "Falcon", "Granite", "Harborline", "Ironwood",
    "Juniper", "Kestrel", "Lumen", "Meridian", "Northwind", "Oakridge", "Pinnacle", "Quarry", "Redwood",
    "Silverline", "Tidewater", "Umbra", "Vantage", "Willowby", "Xenith", "Yarrow", "Zenova", "Amberly",
    "Bluefin", "Crestview", "Driftwood", "Emberline", "Foxglove",
]

_FIELDS = [
    "computer science", "mathematics", "physics", "chemistry", "biology", "economics", "history",
    "philosophy", "mechanical engineering", "electrical engineering", "civil engineering", "medicine",
    "nursing", "law", "journalism", "linguistics", "music", "fine arts", "psychology", "sociology",
    "finance", "statistics", "marine biology", "architecture",
]

_HOBBIES = [
    "chess", "rock climbing", "gardening", "birdwatching", "playing the cello", "sailing", "pottery",
    "marathon running", "photography", "beekeeping", "woodworking", "watercolor painting", "baking bread",
    "astronomy", "fly fishing", "knitting", "cycling", "origami", "scuba diving", "playing the piano",
    "stamp collecting", "hiking", "calligraphy", "fencing", "salsa dancing",
]

_MONTHS = [
    ("January", 31), ("February", 28), ("March", 31), ("April", 30), ("May", 31), ("June", 30),
    ("July", 31), ("August", 31), ("September", 30), ("October", 31), ("November", 30), ("December", 31),
]

_PRONOUNS = {
    "female": {"s": "she", "p": "her"},
    "male": {"s": "he", "p": "his"},
}
_KIN = {
    "parent": {"female": "mother", "male": "father"},
    "child": {"female": "daughter", "male": "son"},
    "sibling": {"female": "sister", "male": "brother"},
}

# Placeholders: {S}/{s} subject at sentence start / mid-sentence, {Sp}/{sp} its
# possessive, {p} possessive pronoun, {s_pron} subject pronoun. The subject may be
# the full name, the first name or a pronoun, which is what makes the templates vary.
# Every template names its subject, since any of them can open a biography.
_TEMPLATES: dict[str, list[str]] = {
    "birth_date": [
        "{S} was born on {date}.",
        "{Sp} date of birth is {date}.",
        "{S} came into the world on {date}.",
        "Records show that {s} was born on {date}.",
    ],
    "birth_city": [
        "{S} was born in {city}, {country}.",
        "{Sp} hometown is {city}, {country}.",
        "{S} is a native of {city}, {country}.",
        "{S} spent {p} childhood in {city}, {country}, where {s_pron} was born.",
    ],
    "university": [
        "{S} studied at {university} in {ucity}, {ucountry}.",
        "{S} graduated from {university}, located in {ucity}, {ucountry}.",
        "{S} attended {university} in {ucity}, {ucountry}.",
        "{S} earned {p} degree from {university} in {ucity}, {ucountry}.",
    ],
    "field": [
        "{S} majored in {field}.",
        "{Sp} field of study was {field}.",
        "{S} specialized in {field} during {p} studies.",
        "At university, {s} focused on {field}.",
    ],
    "employer": [
        "{S} works for {employer}, {a_industry} company based in {ecity}, {ecountry}.",
        "{S} is employed by {employer}, {a_industry} firm headquartered in {ecity}, {ecountry}.",
        "{S} joined {employer}, {a_industry} company from {ecity}, {ecountry}, after graduating.",
        "These days {s} works at {employer}, {a_industry} business in {ecity}, {ecountry}.",
    ],
    "job_title": [
        "{S} works as {a_job}.",
        "{Sp} job title is {job}.",
        "{S} holds the position of {job}.",
        "By profession, {s} is {a_job}.",
    ],
    "hobby": [
        "In {p} free time, {s} enjoys {hobby}.",
        "{S} is passionate about {hobby}.",
        "{Sp} favorite pastime is {hobby}.",
        "{S} is known among friends for {p} love of {hobby}.",
    ],
    "parent": [
        "{Sp} {kin} is {other}.",
        "{S} is the {child_kin} of {other}.",
        "{S} was raised by {p} {kin}, {other}.",
        "{other} is {sp} {kin}.",
    ],
    "sibling": [
        "{Sp} {kin} is {other}.",
        "{S} has a {kin} named {other}.",
        "{S} and {other} are siblings.",
        "{other} is {sp} {kin}.",
    ],
    "mentor": [
        "{S} was mentored by {other}.",
        "{Sp} mentor was {other}.",
        "Early in {p} career, {s} learned a great deal from {p} mentor, {other}.",
        "{S} credits {other} as {p} most important mentor.",
    ],
}


TEMPLATES = _TEMPLATES  # relation -> its four sentence templates (read-only use)


def _article(phrase: str) -> str:
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def _with_article(entity: str) -> str:
    # "studied at the University of X" reads naturally; the entity name itself stays bare.
    return "the " + entity if entity.startswith(("University", "Royal")) else entity


def _unique_names(rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """Sample `n` distinct (first, last, gender) names; middle initials extend the space."""
    firsts = [(f, "female") for f in _FEMALE_FIRST] + [(m, "male") for m in _MALE_FIRST]
    base = len(firsts) * len(_LAST)
    # Slot k < base is "First Last"; slot k >= base adds a middle initial, so
    # sampling distinct slots guarantees distinct strings.
    capacity = base * 27
    if n > capacity:
        raise ValueError(f"num_people={n} exceeds the {capacity} unique names available")
    names = []
    for slot in rng.sample(range(capacity if n > base else base), n):
        initial, rest = divmod(slot, base)
        f_idx, l_idx = divmod(rest, len(_LAST))
        first, gender = firsts[f_idx]
        middle = f" {chr(ord('A') + initial - 1)}." if initial else ""
        names.append((first + middle, _LAST[l_idx], gender))
    return names


def _build_world(rng: random.Random) -> dict:
    """Seeded entities: cities in countries, universities in cities, companies in industries."""
    cities = list(_CITIES)
    rng.shuffle(cities)
    # Round-robin keeps every country populated while the shuffle varies the map per seed.
    city_country = {c: _COUNTRIES[i % len(_COUNTRIES)] for i, c in enumerate(cities)}

    universities = {}
    for city in rng.sample(cities, 14):
        universities[f"University of {city}"] = city
    for name in _NAMED_UNIVERSITIES:
        universities[name] = rng.choice(cities)

    companies = {}
    industries = list(_INDUSTRIES)
    prefixes = list(_COMPANY_PREFIXES)
    rng.shuffle(prefixes)
    for i, prefix in enumerate(prefixes):
        industry = industries[i % len(industries)]
        suffix = rng.choice(_INDUSTRIES[industry][0])
        companies[f"{prefix} {suffix}"] = {"industry": industry, "city": rng.choice(cities)}
    return {"city_country": city_country, "universities": universities, "companies": companies}


def _make_people(rng: random.Random, num_people: int, world: dict) -> list[dict]:
    cities = sorted(world["city_country"])
    universities = sorted(world["universities"])
    companies = sorted(world["companies"])
    people = []
    for idx, (first, last, gender) in enumerate(_unique_names(rng, num_people)):
        month, days = _MONTHS[rng.randrange(12)]
        year = rng.randint(1940, 2002)
        birth_date = f"{rng.randint(1, days)} {month} {year}"
        city = rng.choice(cities)
        uni = rng.choice(universities)
        company = rng.choice(companies)
        info = world["companies"][company]
        people.append({
            "id": idx,
            "name": f"{first} {last}",
            "first_name": first,
            "last_name": last,
            "gender": gender,
            "birth_date": birth_date,
            "birth_year": year,
            "birth_city": city,
            "birth_country": world["city_country"][city],
            "university": uni,
            "university_city": world["universities"][uni],
            "field": rng.choice(_FIELDS),
            "employer": company,
            "employer_industry": info["industry"],
            "employer_city": info["city"],
            "job_title": rng.choice(_INDUSTRIES[info["industry"]][1]),
            "hobbies": rng.sample(_HOBBIES, rng.choice((0, 1, 1, 2))),
            "parents": [],
            "siblings": [],
            "mentor": None,
        })
    _add_relations(rng, people)
    return people


def _add_relations(rng: random.Random, people: list[dict]) -> None:
    """Link people by parent, sibling and mentor edges with plausible age gaps."""
    by_year = sorted(range(len(people)), key=lambda i: (people[i]["birth_year"], i))
    years = [people[i]["birth_year"] for i in by_year]

    def pick_born_between(lo: int, hi: int) -> int | None:
        # Index arithmetic instead of slicing keeps this O(log n) per draw.
        a, b = bisect.bisect_left(years, lo), bisect.bisect_right(years, hi)
        return by_year[rng.randrange(a, b)] if b > a else None

    for p in people:
        y = p["birth_year"]
        if rng.random() < 0.35:
            first = pick_born_between(y - 45, y - 20)
            if first is not None:
                p["parents"].append(first)
                if rng.random() < 0.5:
                    second = pick_born_between(y - 45, y - 20)
                    if second != first:
                        p["parents"].append(second)
        if rng.random() < 0.3:
            mentor = pick_born_between(y - 35, y - 10)
            p["mentor"] = None if mentor in p["parents"] else mentor

    for p in people:
        if rng.random() >= 0.15:
            continue
        y = p["birth_year"]
        other = people[pick_born_between(y - 10, y + 10)]  # never empty: p itself qualifies
        blocked = {p["id"], *p["parents"], *p["siblings"], p["mentor"]}
        if other["id"] in blocked or p["id"] in other["parents"] or p["id"] == other["mentor"]:
            continue
        p["siblings"].append(other["id"])
        other["siblings"].append(p["id"])
        # Siblings share parents where ages allow, so the graph stays consistent.
        for a, b in ((p, other), (other, p)):
            if a["parents"] and not b["parents"]:
                if all(people[q]["birth_year"] <= b["birth_year"] - 18 for q in a["parents"]):
                    if b["id"] not in a["parents"] and b["mentor"] not in a["parents"]:
                        b["parents"] = list(a["parents"])


def person_facts(person: dict, people: dict, world: dict) -> list[tuple[str, dict, tuple[str, str, str]]]:
    """The facts a biography states, in a fixed order: (relation, template slots, triple).

    people: other people by the ids or names `person` refers to them with (parents, siblings, mentor).
    """
    name = person["name"]
    cc = world["city_country"]
    facts: list[tuple[str, dict, tuple[str, str, str]]] = [
        ("birth_date", {"date": person["birth_date"]}, (name, "birth_date", person["birth_date"])),
        ("birth_city", {"city": person["birth_city"], "country": person["birth_country"]},
         (name, "birth_city", person["birth_city"])),
        ("university", {"university": _with_article(person["university"]),
                        "ucity": person["university_city"], "ucountry": cc[person["university_city"]]},
         (name, "university", person["university"])),
        ("field", {"field": person["field"]}, (name, "field", person["field"])),
        ("employer", {"employer": person["employer"], "a_industry": _article(person["employer_industry"]),
                      "ecity": person["employer_city"], "ecountry": cc[person["employer_city"]]},
         (name, "employer", person["employer"])),
        ("job_title", {"job": person["job_title"], "a_job": _article(person["job_title"])},
         (name, "job_title", person["job_title"])),
    ]
    for hobby in person["hobbies"]:
        facts.append(("hobby", {"hobby": hobby}, (name, "hobby", hobby)))
    for rel, refs in (("parent", person["parents"]), ("sibling", person["siblings"])):
        for q in refs:
            other = people[q]
            facts.append((rel, {"other": other["name"], "kin": _KIN[rel][other["gender"]],
                                "child_kin": _KIN["child"][person["gender"]]}, (name, rel, other["name"])))
    if person["mentor"] is not None:
        mentor = people[person["mentor"]]["name"]
        facts.append(("mentor", {"other": mentor}, (name, "mentor", mentor)))
    return facts


def render_facts(rng: random.Random, person: dict, facts: list, templates: Optional[Sequence[int]] = None,
                 full_names: bool = False) -> list[dict]:
    """Shuffle the facts and write one sentence each: [{'text', 'relation', 'triple', 'template', 'ref'}].

    templates: the template indices allowed per relation (None: all four). The first sentence names
    the person in full; later ones use the full name, the first name or a pronoun, or, with
    `full_names`, the full name too (every fact then reads as it does in a cloze probe).
    """
    pron = _PRONOUNS[person["gender"]]
    facts = list(facts)
    rng.shuffle(facts)
    out = []
    for i, (kind, slots, triple) in enumerate(facts):
        if i == 0 or full_names:
            ref = person["name"]  # the opening sentence must introduce the person by full name
        else:
            ref = rng.choice((person["name"], person["first_name"], None, None))
        if ref is None:
            subj = {"S": pron["s"].capitalize(), "s": pron["s"],
                    "Sp": pron["p"].capitalize(), "sp": pron["p"]}
        else:
            subj = {"S": ref, "s": ref, "Sp": ref + "'s", "sp": ref + "'s"}
        options = _TEMPLATES[kind] if templates is None else [_TEMPLATES[kind][t] for t in templates]
        template = rng.choice(options)
        text = template.format(**subj, p=pron["p"], s_pron=pron["s"], **slots)
        out.append({"text": text, "relation": kind, "triple": triple, "template": _TEMPLATES[kind].index(template),
                    "ref": ref, "slots": slots})
    return out


def _render(rng: random.Random, person: dict, people: list[dict], world: dict,
            templates: Optional[Sequence[int]] = None, full_names: bool = False) -> tuple[str, list]:
    """Write one biography and return it with the person's triples."""
    facts = person_facts(person, people, world)
    sentences = render_facts(rng, person, facts, templates, full_names)
    return " ".join(s["text"] for s in sentences), [f[2] for f in facts]


def check_templates(templates: Optional[Sequence[int]], key: str = "templates") -> Optional[list[int]]:
    """Validated template indices (None: all four); `key` names the setting in the error."""
    if templates is None:
        return None
    out = [int(t) for t in templates]
    if not out or len(set(out)) != len(out) or any(not 0 <= t < 4 for t in out):
        raise ValueError(f"{key} must be distinct template indices in [0, 3] (or null for all), "
                         f"got {list(templates)}")
    return sorted(out)


def generate_biographies(num_people: int = 2000, seed: int = 0,
                         templates: Optional[Sequence[int]] = None, renderings: int = 1,
                         full_names: bool = False) -> BiographyCorpus:
    """Generate `num_people` fictional biographies and their fact triples from `seed`.

    templates: the sentence templates (indices 0-3 of each relation's four) the biographies are
    written with; None (all four) is the historical corpus, byte for byte.
    renderings: biographies per person (knowledge augmentation, as in "Physics of Language Models"
    3.1): rendering r > 0 of every person follows the first `num_people` documents (document i is
    about person i % num_people), each with its own sentence order, templates and references, drawn
    from a generator of (seed, r), so the first rendering is the same corpus whatever `renderings` is.
    full_names: every sentence names the person in full (no first names or pronouns).
    The defaults (1, False) are the historical corpus, byte for byte.
    """
    if num_people < 1:
        raise ValueError(f"num_people must be >= 1, got {num_people}")
    if isinstance(renderings, bool) or not isinstance(renderings, int) or renderings < 1:
        raise ValueError(f"renderings must be an integer >= 1, got {renderings!r}")
    templates = check_templates(templates)
    rng = random.Random(seed)
    world = _build_world(rng)
    people = _make_people(rng, num_people, world)

    documents, triples = [], []
    for person in people:
        doc, person_triples = _render(rng, person, people, world, templates, full_names)
        documents.append(doc)
        triples.extend(person_triples)
    for r in range(1, renderings):
        extra = random.Random(f"biographies/{seed}/rendering/{r}")
        documents.extend(_render(extra, person, people, world, templates, full_names)[0] for person in people)

    # Entity facts only for entities some biography mentions, in first-mention
    # order, so each one co-occurs with its object in at least one document.
    seen: dict[tuple[str, str, str], None] = {}
    for p in people:
        for city in (p["birth_city"], p["university_city"], p["employer_city"]):
            seen[(city, "country", world["city_country"][city])] = None
        seen[(p["university"], "located_in", p["university_city"])] = None
        seen[(p["employer"], "industry", p["employer_industry"])] = None
        seen[(p["employer"], "headquartered_in", p["employer_city"])] = None
    triples.extend(seen)

    for p in people:
        p["parents"] = [people[q]["name"] for q in p["parents"]]
        p["siblings"] = [people[q]["name"] for q in p["siblings"]]
        if p["mentor"] is not None:
            p["mentor"] = people[p["mentor"]]["name"]
    return BiographyCorpus(documents=documents, triples=triples, people=people, world=world, renderings=renderings)


def _cloze_text(person: dict, relation: str, slots: dict, obj: str, template: int) -> tuple[str, int]:
    """The fact in template `template` with the subject named in full wherever the template names it,
    and where the object starts in it (-1 when the template states the object before the subject)."""
    name, pron = person["name"], _PRONOUNS[person["gender"]]
    subj = {"S": name, "s": name, "Sp": name + "'s", "sp": name + "'s"}
    # A marker in place of the object finds its slot, never a look-alike substring elsewhere.
    marked = {k: v.replace(obj, "\x00") if isinstance(v, str) else v for k, v in slots.items()}
    text = _TEMPLATES[relation][template].format(**subj, p=pron["p"], s_pron=pron["s"], **marked)
    start = text.find("\x00")
    return text.replace("\x00", obj), start if 0 <= text.find(name) < start else -1


def fact_cloze_probes(bios: BiographyCorpus, people: Sequence[int], templates: Optional[Sequence[int]] = None,
                      max_probes: Optional[int] = None, seed: int = 0, max_candidates: Optional[int] = None,
                      ) -> list[dict]:
    """Cloze probes for a causal LM: one fact of one person, written in one template, to be continued.

    Every (person, fact, template) with the subject named before the object is a probe (a template
    that states the object first, "{other} is {sp} {kin}.", cannot be continued and is skipped); they
    are shuffled by `seed` and the first `max_probes` kept (None: all). Each probe is {'text', 'start', 'end',
    'answer', 'answers', 'candidates', 'relation', 'template', 'subject'}: the sentence, the character
    span of the answer (the prompt is text[:start]), the true objects of the subject for the relation
    (a person can have two hobbies), and the relation's objects over all people to rank the answer
    among, the other true objects left out (filtered ranking). max_candidates: at most that many
    candidates (the answer plus distractors drawn by (seed, subject, relation, answer)); None: all.

    people: indices into bios.people; templates: indices 0-3 (None: all four).
    """
    templates = check_templates(templates) or [0, 1, 2, 3]
    if max_candidates is not None and max_candidates < 2:
        raise ValueError(f"max_candidates must be >= 2 or None, got {max_candidates}")
    by_name = {p["name"]: p for p in bios.people}
    objects: dict[str, set] = {}
    for s, r, o in bios.triples:
        if s in by_name:
            objects.setdefault(r, set()).add(o)
    pool = {r: sorted(v) for r, v in objects.items()}

    found = []
    for idx in people:
        person = bios.people[idx]
        facts = person_facts(person, by_name, bios.world)
        true: dict[str, list] = {}
        for relation, _, triple in facts:
            true.setdefault(relation, []).append(triple[2])
        for relation, slots, (subject, _, obj) in facts:
            for t in templates:
                text, start = _cloze_text(person, relation, slots, obj, t)
                if start < 0:
                    continue
                found.append((text, start, obj, relation, t, subject, true[relation]))
    random.Random(seed).shuffle(found)
    probes = []
    for text, start, obj, relation, t, subject, answers in found[:max_probes]:
        others = [c for c in pool[relation] if c not in answers]
        if max_candidates is not None and len(others) > max_candidates - 1:
            others = random.Random(f"{seed}:{subject}:{relation}:{obj}").sample(others, max_candidates - 1)
        probes.append({"text": text, "start": start, "end": start + len(obj), "answer": obj,
                       "answers": list(answers), "candidates": sorted([obj, *others]), "relation": relation,
                       "template": t, "subject": subject})
    return probes
