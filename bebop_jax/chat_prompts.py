"""A built-in source of general chat prompts: `make_prompt(rng) -> str`, the `chat` source of `bebop sample-data`.

Draft heads learn the policy's behaviour on the prompts they see. The RL sources (math, the calculator
tool, code) cover what RL rolls out; `chat` adds everyday instructions (explain, compare, list, write,
rewrite, plan, define) so that heads self-distilled on a mix also accept on prompts outside RL, as
`bebop generate` meets them. Each prompt is a template filled from word lists: 24 templates over 91
topics, 40 writing subjects and smaller lists give ~2.9k distinct prompts. The policy writes the answers, so their
variety comes from the model, not from here.
Left out on purpose: multi-turn conversations, system prompts, anything needing outside knowledge to grade.
"""

from __future__ import annotations

import numpy as np

_TOPICS = (
    "photosynthesis", "the water cycle", "gravity", "black holes", "volcanoes", "earthquakes", "the moon's phases",
    "climate change", "electricity", "magnets", "the human heart", "the immune system", "sleep", "vaccines",
    "DNA", "evolution", "the solar system", "rainbows", "tides", "the seasons", "recycling", "renewable energy",
    "solar panels", "wind turbines", "batteries", "the internet", "email", "passwords", "encryption",
    "machine learning", "computer memory", "operating systems", "databases", "spreadsheets", "binary numbers",
    "compound interest", "budgeting", "inflation", "supply and demand", "taxes", "saving for retirement",
    "the stock market", "credit cards", "democracy", "the Roman Empire", "the printing press",
    "the industrial revolution", "ancient Egypt", "the Silk Road", "the Olympic Games", "chess", "jazz",
    "photography", "painting with watercolors", "learning a new language", "public speaking", "time management",
    "meditation", "running a marathon", "healthy eating", "drinking enough water", "growing tomatoes",
    "composting", "keeping houseplants alive", "baking bread", "making coffee", "cooking rice",
    "caring for a dog", "adopting a cat", "bird migration", "honeybees", "coral reefs", "rainforests",
    "deserts", "glaciers", "ocean currents", "clouds", "lightning", "snowflakes", "fractions", "prime numbers",
    "probability", "the Pythagorean theorem", "maps and compasses", "first aid", "fire safety",
    "writing a resume", "job interviews", "teamwork", "giving feedback", "reading more books",
)
_SUBJECTS = (
    "a lighthouse keeper", "a lost umbrella", "the first day of school", "a robot learning to paint",
    "a rainy afternoon", "an old bicycle", "a small village by the sea", "a friendly dragon", "the last train home",
    "a garden in winter", "a cat who wants to fly", "a message in a bottle", "a busy kitchen", "the night sky",
    "a mountain hike", "a forgotten key", "a library at midnight", "a street market", "a paper boat",
    "a snowy morning", "a grandmother's recipe", "a new neighbor", "a broken clock", "a summer storm",
    "a city park", "a long journey by ship", "an empty stadium", "a curious fox", "a quiet forest",
    "the smell of fresh bread", "a birthday surprise", "a window seat", "the sound of waves", "a school play",
    "a spaceship crew", "a tiny island", "a morning run", "a stray dog", "an autumn leaf", "a music box",
)
_PAIRS = (
    ("weather", "climate"), ("a virus", "a bacterium"), ("speed", "velocity"), ("RAM", "storage"),
    ("a lake", "a pond"), ("a simile", "a metaphor"), ("saving", "investing"), ("a crocodile", "an alligator"),
    ("tea", "coffee"), ("a list", "a set"), ("renting", "buying a home"), ("a hurricane", "a tornado"),
    ("an atom", "a molecule"), ("a comet", "an asteroid"), ("a democracy", "a monarchy"), ("mass", "weight"),
    ("a poem", "a song"), ("walking", "cycling to work"), ("email", "a letter"), ("fruits", "vegetables"),
)
_FORMS = ("a short poem", "a haiku", "a limerick", "a short story", "a diary entry", "a short dialogue",
          "a product description", "a thank-you note", "a news headline and a short paragraph")
_AUDIENCES = ("a ten-year-old", "a beginner", "a busy manager", "my grandmother", "a new student")
_TASKS = ("plan a birthday party", "organize my desk", "prepare for an exam", "start exercising",
          "learn to cook", "save money on groceries", "plan a weekend trip", "write a cover letter",
          "make new friends in a new city", "stay focused while studying", "clean a kitchen quickly",
          "pack for a camping trip", "choose a laptop", "train for a 5 km run", "start a vegetable garden")
_SENTENCES = (
    "the meeting have been moved to tuesday because of the weather",
    "me and him goes to the store every weekend",
    "their going to finish the project tomorow",
    "the results was better then we expected",
    "she dont like when people is late",
    "we was happy to see you at the party last night",
)

_TEMPLATES = (
    lambda r: f"Explain {_pick(r, _TOPICS)} in simple terms.",
    lambda r: f"Explain {_pick(r, _TOPICS)} to {_pick(r, _AUDIENCES)}.",
    lambda r: f"What is {_pick(r, _TOPICS)}? Answer in two or three sentences.",
    lambda r: f"Give me three interesting facts about {_pick(r, _TOPICS)}.",
    lambda r: f"Why is {_pick(r, _TOPICS)} important?",
    lambda r: f"List five key points about {_pick(r, _TOPICS)}.",
    lambda r: f"Write a short paragraph about {_pick(r, _TOPICS)}.",
    lambda r: f"What are the pros and cons of {_pick(r, _TOPICS)}?",
    lambda r: f"Write {_pick(r, _FORMS)} about {_pick(r, _SUBJECTS)}.",
    lambda r: f"Write {_pick(r, _FORMS)} about {_pick(r, _TOPICS)}.",
    lambda r: f"Tell me a story about {_pick(r, _SUBJECTS)} in five sentences.",
    lambda r: f"Describe {_pick(r, _SUBJECTS)} using vivid details.",
    lambda r: "What is the difference between {} and {}?".format(*_pick(r, _PAIRS)),
    lambda r: "Compare {} and {} in a short list.".format(*_pick(r, _PAIRS)),
    lambda r: f"How do I {_pick(r, _TASKS)}? Give step-by-step advice.",
    lambda r: f"Give me a simple plan to {_pick(r, _TASKS)}.",
    lambda r: f"What are common mistakes people make when they {_pick(r, _TASKS)}?",
    lambda r: f"Give me three tips for {_pick(r, _TOPICS)}.",
    lambda r: f"Fix the grammar in this sentence: \"{_pick(r, _SENTENCES)}\"",
    lambda r: f"Rewrite this sentence to sound more formal: \"{_pick(r, _SENTENCES)}\"",
    lambda r: f"Suggest a title for an article about {_pick(r, _TOPICS)}.",
    lambda r: f"Write three quiz questions about {_pick(r, _TOPICS)}, with answers.",
    lambda r: f"Summarize what someone should know about {_pick(r, _TOPICS)} in one paragraph.",
    lambda r: f"Define {_pick(r, _TOPICS)} and give one everyday example.",
)


def _pick(rng: np.random.Generator, options: tuple):
    return options[int(rng.integers(len(options)))]


def make_prompt(rng: np.random.Generator) -> str:
    """One general instruction, drawn from `rng` (a template, then its fillers)."""
    return _pick(rng, _TEMPLATES)(rng)
