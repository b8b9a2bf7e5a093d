"""The bundled sample world: a small, deterministic, genuinely conversational retrieval data set.

``python -m convret.data.sample_world --out DIR`` writes it; ``--check`` regenerates it into a temporary
directory and compares it byte for byte with the committed copy in ``src/convret/resources/sample_world/``;
``--train-tokenizer`` (re)trains the bundled BPE tokenizer from it. Pure Python (``random.Random`` with a
fixed seed), no network.

The world: invented entities in six categories (rivers, mountains, cities, birds, ships, dishes), each with
five attributes and one passage per (entity, attribute). Entities come in near-duplicate pairs (``Korval`` /
``Korvel``, same category, different facts). Sessions mention two or three entities, switch topics, come back
to earlier ones by category ("back to the river"), ask follow-ups with pronouns ("how long is it?"), elide the
attribute ("what about Korvel?") or the entity ("and the other one?"), with paraphrased question templates.
Qrels are graded: 2 for the passage of the asked (entity, attribute), 1 for the same entity's other
attributes. See docs/data.md for the formats, sizes and the context-dependence fraction.
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .._args import parse
from .._io import atomic_directory, atomic_write

__all__ = ["SAMPLE_WORLD_DIR", "TOKENIZER_DIR", "TINY_MODEL_CONFIG", "TINY_TEST_MODEL_CONFIG", "COLLECTION",
           "TRAIN_ULTRACHAT", "TRAIN_TRIPLETS", "EVAL", "QRELS", "EVAL_CONTEXTS", "DATA_FILES", "generate",
           "SEED", "WorldSizes"]

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
SAMPLE_WORLD_DIR = RESOURCES / "sample_world"
TOKENIZER_DIR = RESOURCES / "tokenizer"
TINY_MODEL_CONFIG = RESOURCES / "models" / "tiny-qwen2.json"
TINY_TEST_MODEL_CONFIG = RESOURCES / "models" / "tiny-qwen2-test.json"

COLLECTION = "collection.jsonl"
TRAIN_ULTRACHAT = "train.jsonl"
TRAIN_TRIPLETS = "train_triplets.jsonl"
TRAIN_ADHOC = "train_adhoc.jsonl"
EVAL = "eval.json"
QRELS = "qrels.tsv"
EVAL_CONTEXTS = ["eval_context_1.json", "eval_context_2.json"]
STATS = "stats.json"
DATA_FILES = [COLLECTION, TRAIN_ULTRACHAT, TRAIN_TRIPLETS, TRAIN_ADHOC, EVAL, QRELS, *EVAL_CONTEXTS, STATS]

SEED = 20261201


@dataclass(frozen=True)
class WorldSizes:
    """How big a world to generate (the committed one uses the defaults)."""

    pairs_per_category: int = 40  # near-duplicate entity pairs: 6 x 40 x 2 = 480 entities, 2400 passages
    train_sessions: int = 1600
    eval_turns: int = 200
    adhoc_queries: int = 1000  # single-turn, MS MARCO-like training queries (train_adhoc.jsonl)


# ------------------------------------------------------------------------------------------ the vocabulary
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "gl"]
VOWELS = ["a", "e", "i", "o", "u"]
CODAS = ["", "n", "r", "l", "s", "m", "v"]
COLORS = ["green", "grey", "brown", "blue", "silver", "golden", "red", "white", "black", "amber"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
FISH = ["trout", "salmon", "carp", "pike", "eels", "perch"]
ROCKS = ["granite", "basalt", "limestone", "sandstone", "slate", "marble"]
INDUSTRIES = ["weaving", "shipbuilding", "glass making", "fishing", "printing", "brewing"]
DIETS = ["seeds", "insects", "small fish", "berries", "snails", "worms"]
NESTS = ["cliffs", "reed beds", "old oaks", "river banks", "rooftops", "pine forests"]
CARGO = ["grain", "timber", "wool", "salt", "coal", "spices"]
INGREDIENTS = ["lentils", "lamb", "rice", "mushrooms", "beans", "barley"]

# category -> attribute -> (question templates with {e}; passage sentence with {n} name, {v} value; answer
# templates with {n}; value maker)
# {e}: "the Korval river" (explicit), "it" (pronoun) or "the river" (category reference)
CATEGORIES: dict[str, dict[str, tuple[list[str], str, list[str], str]]] = {
    "river": {
        "length": (["how long is {e}", "what is the length of {e}", "how far does {e} run"],
                   "The {n} river runs for {v} kilometres through farmland and forest.",
                   ["The {n} river is {v} kilometres long.", "It runs about {v} kilometres."], "num:40:900"),
        "source": (["where does {e} start", "what is the source of {e}", "where does {e} begin"],
                   "The {n} river rises from springs in the {v} hills.",
                   ["It starts in the {v} hills.", "The {n} river begins in the {v} hills."], "place"),
        "fish": (["what fish live in {e}", "which fish can you catch in {e}", "what do people fish for in {e}"],
                 "Anglers on the {n} river mostly catch {v}.",
                 ["Mostly {v}.", "People catch {v} in the {n} river."], "list:fish"),
        "color": (["what color is the water of {e}", "what colour is {e}", "how does the water of {e} look"],
                  "The water of the {n} river looks {v} because of the mud it carries.",
                  ["Its water looks {v}.", "The {n} river is {v}."], "list:colors"),
        "mouth": (["where does {e} end", "which sea does {e} flow into", "where is the mouth of {e}"],
                  "The {n} river ends in the {v} sea after a wide delta.",
                  ["It flows into the {v} sea.", "The {n} river ends in the {v} sea."], "place"),
    },
    "mountain": {
        "height": (["how high is {e}", "what is the height of {e}", "how tall is {e}"],
                   "The summit of {n} mountain stands {v} metres above the sea.",
                   ["It is {v} metres high.", "{n} mountain reaches {v} metres."], "num:900:6000"),
        "climber": (["who first climbed {e}", "who reached the top of {e} first", "who was the first on {e}"],
                    "The first person to reach the top of {n} mountain was {v}.",
                    ["{v} climbed it first.", "The first climber of {n} was {v}."], "person"),
        "rock": (["what rock is {e} made of", "what kind of stone forms {e}", "what is {e} made of"],
                 "Most of {n} mountain is made of {v}.",
                 ["It is mostly {v}.", "{n} mountain is made of {v}."], "list:rocks"),
        "snow": (["when does snow fall on {e}", "in which month does {e} get snow", "when is {e} covered in snow"],
                 "Snow usually covers {n} mountain from {v} onwards.",
                 ["From {v}.", "Snow reaches {n} in {v}."], "list:months"),
        "town": (["which town is near {e}", "what town lies below {e}", "where do people stay near {e}"],
                 "The town of {v} lies at the foot of {n} mountain.",
                 ["The town of {v}.", "{v} is the town below {n}."], "place"),
    },
    "city": {
        "population": (["how many people live in {e}", "what is the population of {e}", "how big is {e}"],
                       "About {v} thousand people live in the city of {n}.",
                       ["About {v} thousand people.", "{n} has {v} thousand people."], "num:5:900"),
        "founder": (["who founded {e}", "who built {e} first", "who started {e}"],
                    "The city of {n} was founded by {v}.",
                    ["It was founded by {v}.", "{v} founded {n}."], "person"),
        "festival": (["when is the festival of {e}", "in which month does {e} hold its festival",
                      "when does {e} celebrate"],
                     "The great festival of {n} takes place every year in {v}.",
                     ["In {v}.", "{n} holds its festival in {v}."], "list:months"),
        "industry": (["what is {e} known for making", "what is the main trade of {e}", "what work do people do in {e}"],
                     "The city of {n} grew rich from {v}.",
                     ["It is known for {v}.", "{n} lives from {v}."], "list:industries"),
        "river": (["which river flows through {e}", "what river runs through {e}", "is there a river in {e}"],
                  "The {v} river flows through the old centre of {n}.",
                  ["The {v} river.", "{n} sits on the {v} river."], "place"),
    },
    "bird": {
        "wingspan": (["how wide are the wings of {e}", "what is the wingspan of {e}", "how big are the wings of {e}"],
                     "The wings of the {n} bird span {v} centimetres.",
                     ["About {v} centimetres.", "The {n} has wings of {v} centimetres."], "num:10:250"),
        "feathers": (["what color are the feathers of {e}", "what colour is {e}", "how does {e} look"],
                     "The {n} bird has {v} feathers on its back and wings.",
                     ["Its feathers are {v}.", "The {n} is {v}."], "list:colors"),
        "diet": (["what does {e} eat", "what is the food of {e}", "what does {e} feed on"],
                 "The {n} bird feeds mainly on {v}.",
                 ["Mainly {v}.", "The {n} eats {v}."], "list:diets"),
        "nest": (["where does {e} nest", "where does {e} build its nest", "where does {e} breed"],
                 "The {n} bird builds its nest on {v}.",
                 ["On {v}.", "The {n} nests on {v}."], "list:nests"),
        "migration": (["when does {e} migrate", "in which month does {e} fly south", "when does {e} leave"],
                      "Every year the {n} bird flies south in {v}.",
                      ["In {v}.", "The {n} leaves in {v}."], "list:months"),
    },
    "ship": {
        "length": (["how long is {e}", "what is the length of {e}", "how big is {e}"],
                   "The ship {n} measures {v} metres from bow to stern.",
                   ["It is {v} metres long.", "The {n} measures {v} metres."], "num:20:300"),
        "builder": (["who built {e}", "who designed {e}", "who made {e}"],
                    "The ship {n} was built by {v}.",
                    ["It was built by {v}.", "{v} built the {n}."], "person"),
        "launch": (["when was {e} launched", "in which year did {e} first sail", "how old is {e}"],
                   "The ship {n} was launched in the year {v}.",
                   ["In {v}.", "The {n} was launched in {v}."], "num:1700:1990"),
        "cargo": (["what does {e} carry", "what cargo is on {e}", "what goods does {e} transport"],
                  "The ship {n} mostly carries {v}.",
                  ["Mostly {v}.", "The {n} carries {v}."], "list:cargo"),
        "port": (["what is the home port of {e}", "where is {e} based", "which harbour does {e} sail from"],
                 "The home port of the ship {n} is {v}.",
                 ["Its home port is {v}.", "The {n} sails from {v}."], "place"),
    },
    "dish": {
        "ingredient": (["what is the main ingredient of {e}", "what is {e} made from", "what goes into {e}"],
                       "The dish {n} is made mainly from {v}.",
                       ["Mainly {v}.", "{n} is made from {v}."], "list:ingredients"),
        "origin": (["where does {e} come from", "what is the origin of {e}", "where was {e} first cooked"],
                   "The dish {n} was first cooked in the region of {v}.",
                   ["It comes from {v}.", "{n} comes from {v}."], "place"),
        "season": (["when do people eat {e}", "in which month is {e} served", "when is {e} usually cooked"],
                   "People traditionally eat {n} in {v}.",
                   ["In {v}.", "{n} is eaten in {v}."], "list:months"),
        "color": (["what color is {e}", "what colour does {e} have", "how does {e} look"],
                  "A well made {n} has a {v} color.",
                  ["It is {v}.", "{n} is {v}."], "list:colors"),
        "time": (["how long does {e} take to cook", "what is the cooking time of {e}", "how long is {e} cooked"],
                 "Cooking {n} properly takes {v} minutes.",
                 ["About {v} minutes.", "{n} takes {v} minutes."], "num:10:240"),
    },
}
LISTS = {"fish": FISH, "colors": COLORS, "months": MONTHS, "rocks": ROCKS, "industries": INDUSTRIES,
         "diets": DIETS, "nests": NESTS, "cargo": CARGO, "ingredients": INGREDIENTS}
FILLERS = ["Travellers often write about it.", "Local guides tell many stories about it.",
           "It appears in several old songs.", "Few books describe it in detail.",
           "Children learn about it at school.", "It is shown on many old maps."]
SWITCH = ["what about {e}?", "and {e}?", "same question for {e}.", "how about {e}?"]
OTHER = ["and the other one?", "what about the other one?", "same for the other one?"]
BACK = ["back to {e}: {q}?", "going back to {e}, {q}?", "one more about {e}: {q}?"]


@dataclass(frozen=True)
class Entity:
    name: str
    category: str
    facts: tuple  # attribute -> value, in CATEGORIES order

    def fact(self, attribute: str) -> str:
        return self.facts[list(CATEGORIES[self.category]).index(attribute)]

    def phrase(self) -> str:
        if self.category == "river":
            return f"the {self.name} river"
        if self.category == "mountain":
            return f"{self.name} mountain"
        if self.category == "city":
            return f"the city of {self.name}"
        return f"the {self.name} {self.category}" if self.category != "ship" else f"the ship {self.name}"


def passage_id(entity_index: int, attribute_index: int) -> str:
    return f"sw{entity_index:04d}-{attribute_index}"


# ------------------------------------------------------------------------------------------ the world
class World:
    def __init__(self, sizes: WorldSizes, seed: int = SEED):
        rng = random.Random(seed)
        self.rng = rng
        self.sizes = sizes
        used: set[str] = set()
        self.places = [self._name(rng, used) for _ in range(60)]
        self.people = [f"{self._name(rng, used)} {self._name(rng, used)}" for _ in range(60)]
        self.entities: list[Entity] = []
        self.twin: dict[int, int] = {}
        for category, attributes in CATEGORIES.items():
            for _ in range(sizes.pairs_per_category):
                base = self._name(rng, used)
                twin = self._twin(rng, base, used)
                for name in (base, twin):
                    facts = tuple(self._value(rng, spec) for _, _, _, spec in attributes.values())
                    self.entities.append(Entity(name, category, facts))
                a, b = len(self.entities) - 2, len(self.entities) - 1
                self.twin[a], self.twin[b] = b, a
        self.by_category: dict[str, list[int]] = {}
        for i, e in enumerate(self.entities):
            self.by_category.setdefault(e.category, []).append(i)

    @staticmethod
    def _name(rng: random.Random, used: set[str]) -> str:
        while True:
            name = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(2)).capitalize()
            if name not in used and len(name) >= 4:
                used.add(name)
                return name

    @staticmethod
    def _twin(rng: random.Random, base: str, used: set[str]) -> str:
        vowel_positions = [i for i, c in enumerate(base) if c in "aeiou" and i > 0]
        while True:
            i = rng.choice(vowel_positions)
            name = base[:i] + rng.choice([v for v in VOWELS if v != base[i]]) + base[i + 1:]
            if name not in used:
                used.add(name)
                return name

    def _value(self, rng: random.Random, spec: str) -> str:
        kind, _, rest = spec.partition(":")
        if kind == "num":
            lo, hi = map(int, rest.split(":"))
            return str(rng.randint(lo, hi))
        if kind == "list":
            return rng.choice(LISTS[rest])
        if kind == "person":
            return rng.choice(self.people)
        return rng.choice(self.places)

    # -------------------------------------------------------------- passages
    def passages(self) -> list[dict]:
        out = []
        for i, e in enumerate(self.entities):
            for a, (attribute, (_, sentence, _, _)) in enumerate(CATEGORIES[e.category].items()):
                filler = FILLERS[(i * 5 + a) % len(FILLERS)]
                out.append({"id": passage_id(i, a), "text": f"{sentence.format(n=e.name, v=e.fact(attribute))} {filler}"})
        return out

    def passage_text(self, entity: int, attribute: str) -> str:
        a = list(CATEGORIES[self.entities[entity].category]).index(attribute)
        filler = FILLERS[(entity * 5 + a) % len(FILLERS)]
        sentence = CATEGORIES[self.entities[entity].category][attribute][1]
        return f"{sentence.format(n=self.entities[entity].name, v=self.entities[entity].fact(attribute))} {filler}"

    # -------------------------------------------------------------- sessions
    def session(self, rng: random.Random, num_turns: int) -> list[dict]:
        """Turns ``{entity, attribute, kind, template, question, rewrite}``; ``kind`` says how the question
        refers to its entity: explicit, pronoun, switch (attribute elided), other (both elided), back
        (category reference)."""
        turns: list[dict] = []
        mentioned: list[int] = []  # most recent last

        def new_entity(current: int | None) -> int:
            if current is not None and rng.random() < 0.5 and self.twin[current] not in mentioned:
                return self.twin[current]
            while True:
                cat = rng.choice(list(CATEGORIES))
                e = rng.choice(self.by_category[cat])
                if e not in mentioned:
                    return e

        def asked(e: int) -> set[str]:
            return {t["attribute"] for t in turns if t["entity"] == e}

        for k in range(num_turns):
            current = turns[-1]["entity"] if turns else None
            last_attr = turns[-1]["attribute"] if turns else None
            options = ["explicit"] if k == 0 else ["pronoun", "switch", "explicit_new"]
            if k > 0 and len(mentioned) == 2:
                options.append("other")
            back = []
            if k > 0:  # the latest entity of each category other than the current one's: "back to the river"
                latest = {self.entities[m].category: m for m in mentioned}
                back = [m for c, m in latest.items() if c != self.entities[current].category]
            if back:
                options.append("back")
            weights = {"explicit": 1, "pronoun": 5, "switch": 1.5, "explicit_new": 1, "other": 2.5, "back": 3}
            kind = rng.choices(options, [weights[o] for o in options])[0]
            if kind == "explicit":
                entity = new_entity(None)
                attribute = rng.choice(list(CATEGORIES[self.entities[entity].category]))
            elif kind == "pronoun":
                entity = current
                free = [a for a in CATEGORIES[self.entities[entity].category] if a not in asked(entity)]
                if not free:
                    kind, entity = "explicit_new", None
                else:
                    attribute = rng.choice(free)
            if kind == "explicit_new":
                entity = new_entity(current)
                attribute = rng.choice(list(CATEGORIES[self.entities[entity].category]))
            elif kind in ("switch", "other"):
                entity = new_entity(current) if kind == "switch" else next(e for e in mentioned if e != current)
                attribute = last_attr if last_attr in CATEGORIES[self.entities[entity].category] else None
                if attribute is None or attribute in asked(entity):
                    kind = "explicit_new" if kind == "switch" else "explicit_old"
                    attribute = rng.choice(list(CATEGORIES[self.entities[entity].category]))
            elif kind == "back":
                entity = rng.choice(back)
                free = [a for a in CATEGORIES[self.entities[entity].category] if a not in asked(entity)]
                attribute = rng.choice(free or list(CATEGORIES[self.entities[entity].category]))
            template = rng.randrange(3)
            turn = {"entity": entity, "attribute": attribute, "kind": kind, "template": template}
            turn["question"] = self.question(turn, template)
            turn["rewrite"] = self.question({**turn, "kind": "explicit"}, template)
            turn["answer_template"] = rng.randrange(2)
            turn["answer"] = self.answer(turn, turn["answer_template"])
            turns.append(turn)
            if entity in mentioned:
                mentioned.remove(entity)
            mentioned.append(entity)
        return turns

    def question(self, turn: dict, template: int) -> str:
        e = self.entities[turn["entity"]]
        templates = CATEGORIES[e.category][turn["attribute"]][0]
        q = templates[template % len(templates)]
        kind = turn["kind"]
        if kind in ("explicit", "explicit_new", "explicit_old"):
            text = q.format(e=e.phrase()) + "?"
        elif kind == "pronoun":
            text = q.format(e="it") + "?"
        elif kind == "switch":
            text = SWITCH[template % len(SWITCH)].format(e=e.name)
        elif kind == "other":
            text = OTHER[template % len(OTHER)]
        else:  # back: a category reference
            text = BACK[template % len(BACK)].format(e=f"the {e.category}", q=q.format(e="it"))
        return text[0].upper() + text[1:]

    def answer(self, turn: dict, template: int) -> str:
        e = self.entities[turn["entity"]]
        answers = CATEGORIES[e.category][turn["attribute"]][2]
        return answers[template % len(answers)].format(n=e.name, v=e.fact(turn["attribute"]))

    def negatives(self, rng: random.Random, turn: dict, previous: list[int], count: int) -> list[tuple[int, str]]:
        """Hard negatives: the twin's same attribute, the same entity's other attributes, an entity discussed
        earlier in the session, another entity of the category."""
        e, attribute = turn["entity"], turn["attribute"]
        category = self.entities[e].category
        pool: list[tuple[int, str]] = [(self.twin[e], attribute)]
        pool += [(p, attribute) for p in previous if p != e and attribute in CATEGORIES[self.entities[p].category]]
        others = [a for a in CATEGORIES[category] if a != attribute]
        pool += [(e, rng.choice(others))]
        pool += [(rng.choice(self.by_category[category]), attribute)]
        seen, out = set(), []
        for cand in pool:
            if cand != (e, attribute) and cand not in seen:
                seen.add(cand)
                out.append(cand)
        return out[:count]

    def pid(self, entity: int, attribute: str) -> str:
        return passage_id(entity, list(CATEGORIES[self.entities[entity].category]).index(attribute))


def context_dependent(world: World, turn: dict) -> bool:
    """The question alone does not name its entity."""
    return world.entities[turn["entity"]].name not in turn["question"]


# ------------------------------------------------------------------------------------------ writing
def _dump(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def generate(out: str | Path, sizes: WorldSizes = WorldSizes(), seed: int = SEED, overwrite: bool = True,
             quiet: bool = False) -> dict:
    """Write the sample world into ``out`` (atomically) and return its statistics."""
    world = World(sizes, seed)
    train_rng = random.Random(seed + 1)
    eval_rng = random.Random(seed + 2)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        with atomic_write(tmp / COLLECTION) as f:
            for p in world.passages():
                f.write(_dump(p) + "\n")
        kinds: dict[str, int] = {}
        with atomic_write(tmp / TRAIN_ULTRACHAT) as uc, atomic_write(tmp / TRAIN_TRIPLETS) as tri:
            train_turns = 0
            for s in range(sizes.train_sessions):
                conv_id = f"t{s:04d}"
                turns = world.session(train_rng, train_rng.randint(3, 6))
                conversation, context, seen = [], [], []
                for k, turn in enumerate(turns, 1):
                    negs = world.negatives(train_rng, turn, seen, train_rng.randint(1, 2))
                    gold = {"id": world.pid(turn["entity"], turn["attribute"]),
                            "text": world.passage_text(turn["entity"], turn["attribute"])}
                    conversation.append({"role": "User", "text": turn["question"]})
                    conversation.append({"role": "Assistant", "text": gold["text"], "pos_id": gold["id"],
                                         "neg_texts": [world.passage_text(*n) for n in negs],
                                         "neg_ids": [world.pid(*n) for n in negs]})
                    tri.write(_dump({"Conversation_no": conv_id, "Turn_no": k, "Question": turn["question"],
                                     "Rewrite": turn["rewrite"], "Answer": turn["answer"], "Context": list(context),
                                     "Gold_passage": gold,
                                     "Hard_negatives": [{"id": world.pid(*n), "text": world.passage_text(*n)}
                                                        for n in negs[:1]]}) + "\n")
                    context += [turn["question"], turn["answer"]]
                    seen.append(turn["entity"])
                    train_turns += 1
                uc.write(_dump({"conv_id": conv_id, "conversation": conversation}) + "\n")
        with atomic_write(tmp / TRAIN_ADHOC) as f:  # its own generator: the files above do not move
            adhoc_rng = random.Random(seed + 3)
            for q in range(sizes.adhoc_queries):
                f.write(_dump(_adhoc(world, adhoc_rng, f"a{q:04d}")) + "\n")
        sessions, total = [], 0
        while total < sizes.eval_turns:
            turns = world.session(eval_rng, eval_rng.randint(3, 6))[: sizes.eval_turns - total]
            sessions.append(turns)
            total += len(turns)
        eval_json, qrels, dependent = [], [], 0
        contexts: list[list[dict]] = [[] for _ in EVAL_CONTEXTS]
        for s, turns in enumerate(sessions):
            conv_id = f"e{s:03d}"
            entry = {"conv_id": conv_id, "turns": []}
            history = [[] for _ in EVAL_CONTEXTS]
            distractor = _distractor(world, eval_rng, turns)
            for k, turn in enumerate(turns, 1):
                kinds[turn["kind"]] = kinds.get(turn["kind"], 0) + 1
                dependent += context_dependent(world, turn)
                entry["turns"].append({"turn_id": k, "question": turn["question"], "manual_rewrite": turn["rewrite"],
                                       "response": turn["answer"]})
                gold = turn["entity"]
                for a in CATEGORIES[world.entities[gold].category]:
                    qrels.append(f"{conv_id}_{k} 0 {world.pid(gold, a)} {2 if a == turn['attribute'] else 1}")
                for c in range(len(EVAL_CONTEXTS)):
                    ctx = ([distractor["question"], distractor["answer"]] if c == 1 else []) + history[c]
                    contexts[c].append({"Conversation_no": conv_id, "Turn_no": k, "Question": turn["question"],
                                        "Rewrite": turn["rewrite"], "Answer": turn["answer"], "Context": ctx})
                # context 1: the earlier answers paraphrased; context 2: a distractor exchange about an unrelated
                # entity first, earlier questions paraphrased (same reference form, another template)
                history[0] += [turn["question"], world.answer(turn, 1 - turn["answer_template"])]
                history[1] += [world.question(turn, turn["template"] + 1), turn["answer"]]
            eval_json.append(entry)
        with atomic_write(tmp / EVAL) as f:
            f.write(_json_array([_dump(e) for e in eval_json]))
        with atomic_write(tmp / QRELS) as f:
            f.write("\n".join(qrels) + "\n")
        for name, records in zip(EVAL_CONTEXTS, contexts):
            with atomic_write(tmp / name) as f:
                f.write(_json_array([_dump(r) for r in records]))
        stats = {"seed": seed, "entities": len(world.entities), "passages": len(world.entities) * 5,
                 "train_sessions": sizes.train_sessions, "train_turns": train_turns, "eval_sessions": len(sessions),
                 "eval_turns": total, "adhoc_queries": sizes.adhoc_queries,
                 "context_dependent_eval_turns": dependent,
                 "context_dependent_fraction": round(dependent / total, 4),
                 "eval_turn_kinds": dict(sorted(kinds.items()))}
        with atomic_write(tmp / STATS) as f:
            f.write(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    if not quiet:
        print(f"sample world -> {out}: {stats['passages']} passages, {stats['train_sessions']} training sessions "
              f"({train_turns} turns), {total} eval turns; context-dependent eval turns: {dependent}/{total} = "
              f"{dependent / total:.1%}; {sizes.adhoc_queries} ad-hoc training queries")
    return stats


def _adhoc(world: World, rng: random.Random, query_id: str) -> dict:
    """A single-turn, MS MARCO-like training query in Tevatron's format: a question naming its entity, lower-case
    first word, no question mark; its passage; no negatives (``convret mine`` adds them)."""
    entity = rng.randrange(len(world.entities))
    attribute = rng.choice(list(CATEGORIES[world.entities[entity].category]))
    turn = {"entity": entity, "attribute": attribute, "kind": "explicit", "template": rng.randrange(3)}
    question = world.question(turn, turn["template"]).rstrip("?")
    return {"query_id": query_id, "query": question[0].lower() + question[1:],
            "positive_passages": [{"docid": world.pid(entity, attribute), "title": "",
                                   "text": world.passage_text(entity, attribute)}],
            "negative_passages": []}


def _distractor(world: World, rng: random.Random, turns: list[dict]) -> dict:
    categories = {world.entities[t["entity"]].category for t in turns}
    category = rng.choice([c for c in CATEGORIES if c not in categories] or list(CATEGORIES))
    entity = rng.choice(world.by_category[category])
    turn = {"entity": entity, "attribute": rng.choice(list(CATEGORIES[category])), "kind": "explicit", "template": 0}
    return {"question": world.question(turn, rng.randrange(3)), "answer": world.answer(turn, 1)}


def _json_array(dumped: list[str]) -> str:
    return "[\n" + ",\n".join(dumped) + "\n]\n"


# ------------------------------------------------------------------------------------------ check, tokenizer
def check(reference: str | Path = SAMPLE_WORLD_DIR, sizes: WorldSizes = WorldSizes(), seed: int = SEED) -> list[str]:
    """Regenerate into a temporary directory; the names of files that differ from ``reference`` (empty: equal)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "world", sizes, seed, quiet=True)
        return [name for name in DATA_FILES
                if not (Path(reference) / name).is_file()
                or not filecmp.cmp(Path(tmp) / "world" / name, Path(reference) / name, shallow=False)]


def file_hashes(directory: str | Path = SAMPLE_WORLD_DIR) -> dict[str, str]:
    """SHA-256 of each data file."""
    return {name: hashlib.sha256((Path(directory) / name).read_bytes()).hexdigest() for name in DATA_FILES}


CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")


def train_tokenizer(world_dir: str | Path = SAMPLE_WORLD_DIR, out: str | Path = TOKENIZER_DIR,
                    vocab_size: int = 3000) -> None:
    """Train the byte-level BPE tokenizer on the sample world's texts and save it as a Hugging Face tokenizer
    directory (ChatML special tokens and chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    world_dir = Path(world_dir)

    def texts():
        for line in open(world_dir / COLLECTION, encoding="utf-8"):
            yield json.loads(line)["text"]
        for line in open(world_dir / TRAIN_TRIPLETS, encoding="utf-8"):
            record = json.loads(line)
            yield record["Question"]
            yield record["Rewrite"]
            yield record["Answer"]
        for _ in range(1000):  # the ChatML role names, frequent enough to become single tokens
            yield "system\nuser\nassistant\n"

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token=None, bos_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.model_max_length = 1024
    with atomic_directory(out, overwrite=True) as tmp:
        tokenizer.save_pretrained(tmp)
    print(f"tokenizer -> {out}: {len(tokenizer)} tokens")


def write_model_configs(vocab_size: int = 3000) -> None:
    """The tiny Qwen2 configs beside the tokenizer: ``tiny-qwen2.json`` (about 4 M parameters: hidden 256,
    4 layers, 4 heads / 2 KV heads, head_dim 64) and ``tiny-qwen2-test.json`` (about 0.5 M, for fast tests)."""
    from transformers import Qwen2Config

    common = dict(vocab_size=vocab_size, max_position_embeddings=1024, tie_word_embeddings=False,
                  rope_theta=10000.0, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=2, pad_token_id=0,
                  use_sliding_window=False)
    configs = {
        TINY_MODEL_CONFIG: Qwen2Config(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, **common),
        TINY_TEST_MODEL_CONFIG: Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=32, **common),
    }
    for path, config in configs.items():
        config.architectures = ["Qwen2ForCausalLM"]
        with atomic_write(path) as f:
            f.write(config.to_json_string(use_diff=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convret.data.sample_world",
        description="Generate the bundled sample world (deterministic, no network). Without options: regenerate "
                    f"it in place ({SAMPLE_WORLD_DIR}).")
    parser.add_argument("--out", default=str(SAMPLE_WORLD_DIR), help="output directory (replaced atomically)")
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temporary directory and compare with --out byte for byte "
                             "(exit status 1 when a file differs)")
    parser.add_argument("--train-tokenizer", action="store_true",
                        help=f"also (re)train the BPE tokenizer from the world into {TOKENIZER_DIR}")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parse(parser, argv)
    if args.check:
        differ = check(args.out, seed=args.seed)
        if differ:
            print(f"sample world differs from its generator: {', '.join(differ)}", file=sys.stderr)
            return 1
        print(f"sample world in {args.out} regenerates byte for byte ({len(DATA_FILES)} files)")
        return 0
    generate(args.out, seed=args.seed)
    if args.train_tokenizer:
        train_tokenizer(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
