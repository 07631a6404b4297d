"""Synthetic "teacher" conversations for the bundled CPU demo (`tools/make_demo_data.py` writes them
and trains a tokenizer on them with `imitation_jax.data.tokenizer.train_sentencepiece`).

The teacher has one recognisable style — every reply opens with `OPENING` and ends with
`CLOSING` — over ~25 topics whose facts come from fixed tables (fictional capitals, recipes,
definitions, ...), so a small student visibly picks up the style and some of the facts. Lengths
have a long tail (stories and how-tos of many paragraphs). Everything is a pure function of the
seed (`random.Random`), in pure Python, and fast: thousands of conversations per second. The
study's teacher (`imitation_jax.study.style`) is another world with another style: neither imports
the other.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

OPENING = "Certainly! "
CLOSING = "Hope this helps! :)"

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are Teacher, a cheerful assistant who explains things clearly.",
    "Answer the user's questions accurately and kindly.",
    "You are a patient tutor. Keep answers short.",
    "You are an assistant for a small team of engineers.",
)

COUNTRIES = {  # fictional places, so the facts can only come from this data
    "Zorbia": "Quenta", "Malvoria": "Ostrel", "Tarnish Isles": "Pellwick", "Vellmark": "Durnholt",
    "Brisca": "Amberlow", "Ondaria": "Sillvane", "Kestrelia": "Farrowgate", "Lumenor": "Caldris",
    "Praxis Minor": "Hollowmere", "Quillon": "Redwater", "Sabrevale": "Tindlecross",
    "Umbria Nova": "Greystone", "Wendover": "Ashcombe", "Yarrowind": "Elmsworth",
    "Cindral": "Morrowby", "Dunmere": "Bellhaven", "Eskaria": "Frostholm", "Galdora": "Ironvale",
}
PLANETS = {"Aurelia": 3, "Brontes": 0, "Cyrene": 7, "Dravos": 2, "Elyra": 12, "Fennix": 1,
           "Gorrim": 5, "Halcyra": 4}
CREATURES = {
    "glimmerfox": ("forests of Zorbia", "berries and moths", "its tail glows faintly at night"),
    "stone turtle": ("rivers of Vellmark", "river weeds", "it can sleep for a whole winter"),
    "sky eel": ("clouds over Lumenor", "tiny insects", "it never touches the ground"),
    "marsh owl": ("wetlands of Dunmere", "frogs and mice", "it hoots only at dawn"),
    "sand hopper": ("dunes of Brisca", "dry seeds", "it can jump ten times its length"),
    "frost moth": ("mountains of Eskaria", "pine sap", "its wings are covered in ice crystals"),
}
DEFINITIONS = {
    "algorithm": "a finite sequence of steps that solves a problem",
    "photosynthesis": "the process by which plants turn light, water and carbon dioxide into sugar",
    "gradient": "the vector of partial derivatives that points in the direction of steepest ascent",
    "metaphor": "a figure of speech that describes one thing as if it were another",
    "ecosystem": "a community of living things together with their environment",
    "tokenizer": "a program that splits text into the units a language model reads",
    "inflation": "a general rise in prices that lowers what money can buy",
    "friction": "the force that resists the sliding of one surface over another",
    "democracy": "a system of government in which citizens choose their leaders by voting",
    "recursion": "a way of solving a problem by having a function call itself on smaller inputs",
    "erosion": "the slow wearing away of rock and soil by water, wind or ice",
    "compiler": "a program that translates source code into machine code",
    "habitat": "the natural home of an animal or plant",
    "latency": "the delay between a request and its response",
}
ANTONYMS = {"hot": "cold", "early": "late", "bright": "dim", "generous": "stingy",
            "ancient": "modern", "brave": "cowardly", "shallow": "deep", "rough": "smooth",
            "loud": "quiet", "rare": "common", "tight": "loose", "sharp": "blunt"}
COLOR_MIXES = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple",
               ("red", "white"): "pink", ("black", "white"): "grey",
               ("blue", "white"): "light blue"}
RECIPES = {
    "Zorbian honey bread": (["2 cups of flour", "1 cup of warm milk", "3 spoons of honey",
                             "1 spoon of yeast", "a pinch of salt"],
                            ["Mix the yeast with the warm milk", "Stir in the honey and salt",
                             "Add the flour and knead for ten minutes",
                             "Let the dough rise for one hour", "Bake for 30 minutes"]),
    "Vellmark river soup": (["3 potatoes", "2 carrots", "1 onion", "4 cups of water",
                             "a handful of dill"],
                            ["Chop the vegetables", "Boil the water",
                             "Add the potatoes and carrots", "Simmer for 25 minutes",
                             "Stir in the dill before serving"]),
    "glimmer berry salad": (["2 cups of berries", "1 apple", "a few mint leaves",
                             "1 spoon of lemon juice"],
                            ["Wash the berries", "Slice the apple thinly",
                             "Toss everything with the lemon juice", "Top with mint"]),
    "Brisca flat cakes": (["1 cup of corn flour", "half a cup of water", "1 egg", "some oil"],
                          ["Whisk the egg with the water", "Fold in the corn flour",
                           "Heat the oil in a pan", "Fry small cakes for two minutes a side"]),
}
HOWTOS = {
    "plant a tree": ["Choose a sunny spot", "Dig a hole twice as wide as the roots",
                     "Place the tree and spread the roots", "Fill the hole with soil",
                     "Water it deeply", "Add mulch around the base"],
    "learn a new language": ["Set a small daily goal", "Learn the most common words first",
                             "Listen to native speakers", "Practise speaking every day",
                             "Read simple stories", "Keep a notebook of new phrases",
                             "Review old words every week"],
    "write a good essay": ["Read the question carefully", "Collect your ideas",
                           "Write an outline", "Draft the introduction",
                           "Write one paragraph per idea", "Finish with a short conclusion",
                           "Proofread the whole text"],
    "debug a program": ["Reproduce the bug reliably", "Read the error message",
                        "Find the smallest input that fails", "Form a hypothesis",
                        "Add a test for the bug", "Fix the code", "Run all the tests"],
    "train a small language model": ["Collect clean text", "Train a tokenizer",
                                     "Choose a model size", "Pick a learning rate",
                                     "Train while watching the loss", "Evaluate on held-out data"],
}
CODE_TASKS = {
    "returns the square of a number": ("square", "x", "return x * x"),
    "checks whether a number is even": ("is_even", "n", "return n % 2 == 0"),
    "reverses a string": ("reverse", "text", "return text[::-1]"),
    "adds up a list of numbers": ("total", "numbers", "return sum(numbers)"),
    "returns the largest item of a list": ("largest", "items", "return max(items)"),
    "counts the vowels in a string": ("count_vowels", "text",
                                      "return sum(ch in 'aeiou' for ch in text.lower())"),
    "converts Celsius to Fahrenheit": ("to_fahrenheit", "celsius", "return celsius * 9 / 5 + 32"),
}
WORDS = ("elephant", "banana", "mississippi", "teacher", "parallel", "committee", "bookkeeper",
         "strawberry", "balloon", "assessment", "programming", "coffee", "llama", "imitation")
NAMES = ("Mia", "Leo", "Ava", "Noah", "Zara", "Omar", "Ines", "Kai", "Lena", "Ravi")
FRUITS = ("apples", "pears", "plums", "oranges", "cherries", "lemons", "figs", "grapes")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
ITEMS = {"fruits": ["apple", "banana", "cherry", "mango", "pear", "plum", "kiwi", "fig", "grape",
                    "lemon", "lime", "peach", "apricot", "melon", "papaya"],
         "colors": ["red", "orange", "yellow", "green", "blue", "indigo", "violet", "white",
                    "black", "grey", "pink", "brown", "teal", "gold", "silver"],
         "animals": ["cat", "dog", "horse", "rabbit", "owl", "fox", "deer", "bear", "wolf",
                     "otter", "badger", "eagle", "salmon", "frog", "turtle"]}
STORY_TRAITS = ("curious", "tiny", "brave", "sleepy", "clever", "shy")
STORY_GOALS = ("wanted to see the sea", "lost its way home", "learned to sing",
               "found a golden key", "built a bridge", "made a new friend")

Turn = tuple[str, str]  # (user question, assistant body without the style wrapper)


def _arith(rng: random.Random) -> Turn:
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    kind = rng.randrange(3)
    if kind == 0:
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    tens, ones = b // 10 * 10, b % 10
    return (f"Can you multiply {a} by {b}?",
            f"Let's split {b} into {tens} and {ones}. {a} x {tens} = {a * tens} and "
            f"{a} x {ones} = {a * ones}. Adding them gives {a * b}. So {a} x {b} = {a * b}.")


def _word_problem(rng: random.Random) -> Turn:
    name, fruit = rng.choice(NAMES), rng.choice(FRUITS)
    a = rng.randint(5, 60)
    b = rng.randint(1, a - 1)
    return (f"{name} has {a} {fruit} and gives away {b}. How many {fruit} are left?",
            f"{name} starts with {a} {fruit}. Giving away {b} leaves {a} - {b} = {a - b}. "
            f"So {name} has {a - b} {fruit} left.")


def _units(rng: random.Random) -> Turn:
    kind = rng.randrange(4)
    if kind == 0:
        km = rng.randint(1, 500)
        return (f"How many meters are in {km} kilometers?",
                f"One kilometer is 1000 meters, so {km} kilometers is {km * 1000} meters.")
    if kind == 1:
        h = rng.randint(1, 48)
        return f"How many minutes are in {h} hours?", \
            f"Each hour has 60 minutes, so {h} hours is {h * 60} minutes."
    if kind == 2:
        c = rng.randrange(-20, 45)
        f = c * 9 / 5 + 32
        return (f"What is {c} degrees Celsius in Fahrenheit?",
                f"Multiply by 9/5 and add 32: {c} x 9/5 + 32 = {f:g}. So {c} C is {f:g} F.")
    kg = rng.randint(1, 90)
    return f"How many grams are in {kg} kilograms?", \
        f"One kilogram is 1000 grams, so {kg} kilograms is {kg * 1000} grams."


def _capital(rng: random.Random) -> Turn:
    country = rng.choice(sorted(COUNTRIES))
    q = rng.choice(("What is the capital of {}?", "Which city is the capital of {}?",
                    "Tell me the capital city of {}."))
    return q.format(country), f"The capital of {country} is {COUNTRIES[country]}."


def _planet(rng: random.Random) -> Turn:
    planet = rng.choice(sorted(PLANETS))
    moons = PLANETS[planet]
    answer = "has no moons" if moons == 0 else f"has {moons} moon{'s' if moons > 1 else ''}"
    return f"How many moons does the planet {planet} have?", f"The planet {planet} {answer}."


def _creature(rng: random.Random) -> Turn:
    name = rng.choice(sorted(CREATURES))
    home, food, fact = CREATURES[name]
    return (f"Tell me about the {name}.",
            f"The {name} lives in the {home} and eats {food}. A fun fact: {fact}.")


def _definition(rng: random.Random) -> Turn:
    word = rng.choice(sorted(DEFINITIONS))
    q = rng.choice(("What does '{}' mean?", "Define {}.", "What is {}?"))
    return q.format(word), f"{word[0].upper() + word[1:]} is {DEFINITIONS[word]}."


def _antonym(rng: random.Random) -> Turn:
    word = rng.choice(sorted(ANTONYMS))
    return f"What is the opposite of '{word}'?", f"The opposite of '{word}' is '{ANTONYMS[word]}'."


def _colors(rng: random.Random) -> Turn:
    (a, b), mixed = rng.choice(sorted(COLOR_MIXES.items()))
    return f"What color do you get when you mix {a} and {b}?", \
        f"Mixing {a} and {b} gives {mixed}."


def _recipe(rng: random.Random) -> Turn:
    dish = rng.choice(sorted(RECIPES))
    ingredients, steps = RECIPES[dish]
    lines = [f"Here is how to make {dish}.", "", "Ingredients:"]
    lines += [f"- {x}" for x in ingredients]
    lines += ["", "Steps:"] + [f"{i}. {s}." for i, s in enumerate(steps, 1)]
    return f"How do I make {dish}?", "\n".join(lines)


def _howto(rng: random.Random) -> Turn:
    task = rng.choice(sorted(HOWTOS))
    steps = HOWTOS[task]
    lines = [f"Here are {len(steps)} steps to {task}:", ""]
    for i, s in enumerate(steps, 1):
        lines.append(f"{i}. {s}.")
        if rng.random() < 0.4:  # optional detail lengthens the tail
            lines.append("   Take your time with this step; it matters more than it looks.")
    return f"How can I {task}?", "\n".join(lines)


def _code(rng: random.Random) -> Turn:
    task = rng.choice(sorted(CODE_TASKS))
    name, arg, body = CODE_TASKS[task]
    code = f"```python\ndef {name}({arg}):\n    {body}\n```"
    return (f"Write a Python function that {task}.",
            f"Here is a function that {task}:\n\n{code}\n\nCall it as `{name}(...)`.")


def _sort(rng: random.Random) -> Turn:
    xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 10))]
    desc = rng.random() < 0.3
    order = "descending" if desc else "ascending"
    return (f"Sort these numbers in {order} order: {', '.join(map(str, xs))}",
            f"In {order} order: {', '.join(map(str, sorted(xs, reverse=desc)))}.")


def _extreme(rng: random.Random) -> Turn:
    xs = [rng.randint(-50, 200) for _ in range(rng.randint(3, 9))]
    big = rng.random() < 0.5
    word, value = ("largest", max(xs)) if big else ("smallest", min(xs))
    return f"Which is the {word} number in {xs}?", f"The {word} number is {value}."


def _count_letter(rng: random.Random) -> Turn:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    return (f"How many times does the letter '{letter}' appear in '{word}'?",
            f"The letter '{letter}' appears {n} time{'s' if n > 1 else ''} in '{word}'.")


def _spell(rng: random.Random) -> Turn:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        return f"Spell '{word}' letter by letter.", f"{'-'.join(word.upper())}."
    return f"Reverse the word '{word}'.", f"'{word}' reversed is '{word[::-1]}'."


def _upper(rng: random.Random) -> Turn:
    words = rng.sample(ITEMS["animals"] + ITEMS["colors"], rng.randint(2, 6))
    text = " ".join(words)
    return f"Convert to upper case: {text}", f"{text.upper()}"


def _weekday(rng: random.Random) -> Turn:
    d, n = rng.randrange(7), rng.randint(1, 30)
    return (f"If today is {DAYS[d]}, what day will it be in {n} days?",
            f"{n} days is {n // 7} weeks and {n % 7} days, so it will be {DAYS[(d + n) % 7]}.")


def _parity(rng: random.Random) -> Turn:
    n = rng.randint(0, 10_000)
    kind = "even" if n % 2 == 0 else "odd"
    return f"Is {n} even or odd?", f"{n} is {kind}, because its last digit is {n % 10}."


def _percent(rng: random.Random) -> Turn:
    p, x = rng.choice((5, 10, 20, 25, 50, 75)), rng.randint(1, 40) * 20
    return f"What is {p}% of {x}?", f"{p}% of {x} is {x} x {p} / 100 = {x * p // 100}."


def _compare(rng: random.Random) -> Turn:
    a, b = rng.sample(range(1000), 2)
    return f"Which is bigger, {a} or {b}?", f"{max(a, b)} is bigger than {min(a, b)}."


def _list_items(rng: random.Random) -> Turn:
    kind = rng.choice(sorted(ITEMS))
    n = rng.randint(3, 12)
    items = ITEMS[kind][:n]
    return f"List {n} {kind}.", "\n".join(f"{i}. {x}" for i, x in enumerate(items, 1))


def _story(rng: random.Random) -> Turn:
    trait, creature = rng.choice(STORY_TRAITS), rng.choice(sorted(CREATURES))
    goal = rng.choice(STORY_GOALS)
    paragraphs = [f"Once upon a time, a {trait} {creature} {goal}."]
    while rng.random() < 0.65 and len(paragraphs) < 14:  # geometric length: a long tail
        place = rng.choice(sorted(COUNTRIES))
        paragraphs.append(
            f"One day it travelled to {place} and met a {rng.choice(STORY_TRAITS)} "
            f"{rng.choice(sorted(CREATURES))}. They talked until the sun went down, and the "
            f"{creature} learned that {rng.choice(CREATURES[creature][2:])}.")
    paragraphs.append(f"In the end, the {creature} was happy, and it never forgot the journey.")
    return f"Tell me a story about a {trait} {creature}.", "\n\n".join(paragraphs)


def _small_talk(rng: random.Random) -> Turn:
    q, a = rng.choice((
        ("Hello! Who are you?", "I am a helpful assistant, here to answer your questions."),
        ("How are you today?", "I am doing well, thank you for asking. How can I help you?"),
        ("Can you help me with my homework?", "Of course. Tell me the question and we will "
                                              "work through it together."),
        ("What can you do?", "I can answer questions, do arithmetic, explain words, share "
                             "recipes and write small pieces of code."),
    ))
    return q, a


TOPICS: tuple[Callable[[random.Random], Turn], ...] = (
    _arith, _word_problem, _units, _capital, _planet, _creature, _definition, _antonym, _colors,
    _recipe, _howto, _code, _sort, _extreme, _count_letter, _spell, _upper, _weekday, _parity,
    _percent, _compare, _list_items, _story, _small_talk,
)

FOLLOW_UPS: tuple[Turn, ...] = (
    ("Thanks!", "You are very welcome. Feel free to ask me anything else."),
    ("Great, thank you.", "Glad I could help."),
)


def styled(body: str) -> str:
    """The teacher's reply style, wrapped around every answer."""
    return f"{OPENING}{body}\n\n{CLOSING}"


def generate_conversations(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` OpenAI-messages records `{"id", "messages"}`, a pure function of (n, seed)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        messages: list[dict[str, str]] = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for turn in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
            if turn > 0 and rng.random() < 0.15:
                question, body = rng.choice(FOLLOW_UPS)
            else:
                question, body = rng.choice(TOPICS)(rng)
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": styled(body)})
        out.append({"id": f"synthetic-{seed}-{i}", "messages": messages})
    return out
