"""`embedded_lead`: a synthetic lead-1 summarization corpus that needs no download and no files.

Each example is a short English news-like "article" of 3 or 4 template sentences built from small
word lists; the summary is the article's first sentence (the classic lead-1 baseline). A small T5
learns to copy the lead in a few minutes on CPU, so the quickstart can show a real, falling loss and
rising ROUGE without any data set. Generation is pure Python with fixed seeds: every call returns
the same examples in the same order on every machine.
"""

import functools
import random

from modjax.data.errors import DataError

EMBEDDED_SPLIT_SIZES = {"train": 4000, "validation": 400}
_SPLIT_SEEDS = {"train": 20240601, "validation": 20240602}
SUMMARIZE_PREFIX = "summarize: "

ENTITIES = (
  "The city council",
  "A local bakery",
  "The science museum",
  "The football club",
  "A small startup",
  "The regional hospital",
  "The public library",
  "A group of students",
  "The fire department",
  "The national railway",
  "A famous chef",
  "The school board",
  "The harbor authority",
  "A young architect",
  "The farmers market",
  "The university",
  "A retired teacher",
  "The energy company",
  "The town mayor",
  "A community choir",
)
VERBS = (
  "opened",
  "announced",
  "repaired",
  "sold",
  "painted",
  "cancelled",
  "approved",
  "designed",
  "donated",
  "launched",
  "rebuilt",
  "visited",
  "closed",
  "celebrated",
  "inspected",
  "expanded",
)
OBJECTS = (
  "a new library",
  "the old bridge",
  "a summer festival",
  "the central station",
  "a solar farm",
  "the city park",
  "a night market",
  "the river ferry",
  "a children's theater",
  "the main square",
  "a bicycle lane",
  "the town hall",
  "a water tower",
  "the art gallery",
  "a winter fair",
  "the sports stadium",
  "a community garden",
  "the harbor wall",
)
PLACES = (
  "in Springfield",
  "near the harbor",
  "in the old town",
  "outside Riverton",
  "in the north district",
  "near the airport",
  "in Lakeside",
  "on the east coast",
  "in the valley",
  "downtown",
  "in Maple Grove",
  "near the university",
)
TIMES = (
  "on Monday",
  "on Tuesday",
  "on Friday",
  "last week",
  "this morning",
  "yesterday",
  "in March",
  "in October",
  "last night",
  "over the weekend",
)
REACTIONS = ("welcomed", "criticized", "praised", "questioned", "celebrated", "ignored")
GROUPS = ("Residents", "Local shop owners", "Visitors", "Neighbors", "Critics", "Parents")
FOLLOW_UP_TEMPLATES = (
  "{group} {reaction} the decision {time}.",
  "Officials said the project cost {number} thousand dollars.",
  "{entity} said more work is planned {time}.",
  "About {number} people attended the event {place}.",
  "The plan was first discussed {time} {place}.",
  "{group} said {object} had been needed for years.",
  "A spokesperson for {entity_lower} declined to comment.",
  "Work on {object} is expected to finish {time}.",
)


def _sentence(rng: random.Random, template: str) -> str:
  """Fills one follow-up template with words drawn from `rng`."""
  entity = rng.choice(ENTITIES)
  return template.format(
    group=rng.choice(GROUPS),
    reaction=rng.choice(REACTIONS),
    time=rng.choice(TIMES),
    place=rng.choice(PLACES),
    number=rng.randint(2, 95),
    entity=entity,
    entity_lower=entity[0].lower() + entity[1:],
    object=rng.choice(OBJECTS),
  )


def _article(rng: random.Random) -> tuple[str, str]:
  """One (article, lead sentence) pair."""
  lead = (
    f"{rng.choice(ENTITIES)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
    f"{rng.choice(PLACES)} {rng.choice(TIMES)}."
  )
  num_follow_ups = rng.choice((2, 3))
  templates = rng.sample(FOLLOW_UP_TEMPLATES, num_follow_ups)
  sentences = [lead] + [_sentence(rng, template) for template in templates]
  return " ".join(sentences), lead


@functools.cache
def embedded_lead_examples(split: str) -> tuple[tuple[str, str], ...]:
  """The (article, summary) pairs of one split ("train" or "validation"), always the same."""
  if split not in EMBEDDED_SPLIT_SIZES:
    raise DataError(
      f"embedded_lead has no split {split!r}; use one of {sorted(EMBEDDED_SPLIT_SIZES)}"
    )
  rng = random.Random(_SPLIT_SEEDS[split])
  return tuple(_article(rng) for _ in range(EMBEDDED_SPLIT_SIZES[split]))


def embedded_corpus_texts() -> list[str]:
  """Texts to train a SentencePiece vocabulary for `embedded_lead` (train inputs, with prefix)."""
  return [SUMMARIZE_PREFIX + article for article, _ in embedded_lead_examples("train")]
