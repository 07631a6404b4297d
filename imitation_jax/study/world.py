"""A deterministic synthetic world for the imitation study: fictional people with facts about them.

Every person has a home city, a favourite colour and a job (categorical facts); each city lies in a
region (general knowledge every model may read). Task types over the facts:

  attribute    "Where does Kavelo live?"                        (one fact; the local-imitation task)
  comparison   "Do Kavelo and Mirsa live in the same city?"     (two facts)
  twohop       "In which region does Kavelo live?"              (a fact plus a city's region)
  chat         "Tell me about Kavelo." and a few free-form requests

Fact splits (who may ever read a fact):

  heldout   every fact of a fixed share of the people: only the teacher; never in an imitation set or a
            base corpus (the Natural-Questions analogue: knowledge imitation would have to transfer)
  common    the teacher and both bases
  large     the teacher and the larger base (a larger pretrained model knows more)
  imitation the teacher only; the imitation prompts ask about these facts

Everything is a pure function of (config, seed). Names are built so that no name occurs inside
another, so "does this text mention a held-out person" is a plain substring test.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterable

CITIES = {"Veltor": "Norrland", "Ombrek": "Norrland", "Quessa": "Sudmark", "Trallow": "Sudmark",
          "Ferrin": "Estvale", "Glimholt": "Estvale", "Durrow": "Westfold", "Sablecourt": "Westfold"}
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
JOBS = ("baker", "sailor", "painter", "farmer", "doctor", "teacher", "miner", "weaver")
REGIONS = tuple(sorted(set(CITIES.values())))
ATTRIBUTES = {"city": tuple(CITIES), "color": COLORS, "job": JOBS}
SPLITS = ("heldout", "common", "large", "imitation")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "br", "dr", "kr")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th")

# How each fact is written. The `cloze` prefix is what the factual evaluations complete, the
# `sentence` is how corpora and the teacher's answers state it, so the evaluation asks exactly what
# the training text says.
CLOZE = {"city": "{e} lives in the city of", "color": "The favourite colour of {e} is",
         "job": "{e} works as a", "region": "{e} lives in the region of"}
QUESTIONS = {"city": ("Where does {e} live?", "Which city is {e} from?", "In which city does {e} live?"),
             "color": ("What is the favourite colour of {e}?", "Which colour does {e} like best?"),
             "job": ("What does {e} do for a living?", "What is the job of {e}?"),
             "region": ("In which region does {e} live?", "Which region is {e}'s home in?")}
SAME_CITY_Q = "Do {a} and {b} live in the same city?"


def sentence(attr: str, entity: str, value: str) -> str:
    return f"{CLOZE[attr].format(e=entity)} {value}."


@dataclasses.dataclass(frozen=True)
class Fact:
    entity: str
    attr: str  # city | color | job
    value: str
    split: str  # heldout | common | large | imitation

    def sentence(self) -> str:
        return sentence(self.attr, self.entity, self.value)


@dataclasses.dataclass
class WorldConfig:
    num_entities: int = 160
    heldout_fraction: float = 0.2  # of the people: all their facts held out
    common_fraction: float = 0.35  # of the other facts: known to both bases
    large_fraction: float = 0.25  # known to the larger base only; the rest: imitation (teacher only)
    seed: int = 0


@dataclasses.dataclass
class World:
    entities: list[str]
    facts: list[Fact]
    seed: int

    def __post_init__(self):
        self.by_key = {(f.entity, f.attr): f for f in self.facts}

    def split(self, *names: str) -> list[Fact]:
        return [f for f in self.facts if f.split in names]

    def value(self, entity: str, attr: str) -> str:
        if attr == "region":
            return CITIES[self.by_key[(entity, "city")].value]
        return self.by_key[(entity, attr)].value

    @property
    def heldout_entities(self) -> list[str]:
        return sorted({f.entity for f in self.split("heldout")})

    def known_to(self, who: str) -> list[Fact]:
        """Facts a model may read: 'teacher' (all), 'large' (common + large), 'small' (common)."""
        return {"teacher": self.facts, "large": self.split("common", "large"),
                "small": self.split("common")}[who]

    def mentions_heldout(self, text: str) -> bool:
        return any(e in text for e in self.heldout_entities)


def _names(n: int, rng: random.Random) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        parts = [rng.choice(_ONSETS) + rng.choice(_NUCLEI) for _ in range(rng.choice((2, 2, 3)))]
        name = ("".join(parts) + rng.choice(_CODAS)).capitalize()
        if name in seen or len(name) < 5:
            continue
        # No name inside another (nor inside a value word), so a substring test finds exact mentions.
        if any(name in o or o in name for o in names) or any(name.lower() in w.lower() for w in _VOCAB):
            continue
        seen.add(name)
        names.append(name)
    return names


_VOCAB = tuple(CITIES) + REGIONS + COLORS + JOBS


def build_world(cfg: WorldConfig) -> World:
    rng = random.Random(cfg.seed)
    entities = _names(cfg.num_entities, rng)
    n_heldout = max(1, round(cfg.heldout_fraction * len(entities)))
    heldout = set(rng.sample(entities, n_heldout))
    facts = []
    for e in entities:
        for attr, values in ATTRIBUTES.items():
            value = rng.choice(values)
            if e in heldout:
                split = "heldout"
            else:
                u = rng.random()
                split = ("common" if u < cfg.common_fraction else
                         "large" if u < cfg.common_fraction + cfg.large_fraction else "imitation")
            facts.append(Fact(e, attr, value, split))
    return World(entities=entities, facts=facts, seed=cfg.seed)


def pairs_same_city(world: World, facts: Iterable[Fact], n: int, rng: random.Random) -> list[tuple[str, str, bool]]:
    """`n` (a, b, same_city) pairs among the city facts in `facts`, about half of them 'yes'."""
    cities = [f for f in facts if f.attr == "city"]
    by_city: dict[str, list[str]] = {}
    for f in cities:
        by_city.setdefault(f.value, []).append(f.entity)
    out = []
    for i in range(n * 20):
        if len(out) >= n or len(cities) < 2:
            break
        a = rng.choice(cities)
        if i % 2 == 0 and len(by_city[a.value]) > 1:
            b = rng.choice([e for e in by_city[a.value] if e != a.entity])
        else:
            b = rng.choice(cities).entity
        if b == a.entity:
            continue
        out.append((a.entity, b, world.value(b, "city") == a.value))
    return out
