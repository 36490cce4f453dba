"""The hard regime: the same two data sets with headroom left above an SFT model, so that RL can show
whether it helps (data/synth.py's easy sets put the tiny model at 90–100 % exact-fact accuracy).

* QA: each context states three facts about two or three countries. In half of the prompts (the even
  phrasings) two of them are the asked attribute, so the answer needs the right one of two values of
  the same kind; in the other half the asked attribute is stated once, among facts of other kinds. The
  values are drawn per prompt (one prompt's Pestalia was founded in 1460, another's in 1722), so no
  fact can be memorised: only reading the context answers the question. (With a same-kind rival in
  every prompt the tiny model's SFT accuracy was 32 %: it picked one of the two values at chance.)
* Instruction: brainstorm requests with three or four items and compose requests with three, every one
  of which the answer must cover (the oracle's and the judges' `required`), and explanations that
  compare two. A third of the prompts name topic and items in the request, which the tiny model learns to copy
  (its required-item recall was 99.5 % when every prompt did). The other two thirds are the rival form:
  "Ben's list: salt, herbs and resting. Ana's list: mulch, compost and pruning. Write a short note that
  mentions the items on Ana's list." The answer needs the asked person's items, not the other's
  (`distractor`, from another topic), and the topic they belong to, which the prompt does not name.

Same record fields, the same 80/10/10 stratified split and the same file layout as the easy sets,
under data/hard/: `--data data/hard` selects this regime for every command. Deterministic from the
seed; `python -m data.hard` rewrites the committed files, and a test regenerates them byte for byte.
"""
import random
import re
from itertools import permutations
from pathlib import Path

from data import synth
from data.synth import ANSWERS, CLAUSES, DATA_DIR, DATASETS, QUESTIONS, SIZES, SPLITS, _cap, _world, assign_splits, \
    topics

HARD_DIR = DATA_DIR / "hard"


def _value(rng: random.Random, category: str, world: list[tuple[str, dict[str, str]]]) -> str:
    """A value of one attribute drawn afresh: any country's capital, year, export or animal."""
    if category == "founded":
        return str(rng.randint(1100, 1899))
    return rng.choice(world)[1][category]


def _qa(rng: random.Random) -> list[list[dict]]:
    """QA records grouped by (country, attribute) asked, 10 phrasings each: 1,000 groups."""
    world = _world(rng)
    names = [c for c, _ in world]
    groups = []
    for entity, _ in world:
        for category in CLAUSES:
            group = []
            for i, q in enumerate(QUESTIONS[category]):
                rival, third = rng.sample([n for n in names if n != entity], 2)
                other, another = rng.sample([c for c in CLAUSES if c != category], 2)
                value = _value(rng, category, world)
                rival_value = None
                if i % 2 == 0:  # a same-kind rival: the answer needs the right one of two values
                    rival_value = _value(rng, category, world)
                    while rival_value == value:
                        rival_value = _value(rng, category, world)
                    second = (rival, category, rival_value)
                else:  # the asked attribute stated once, among facts of other kinds
                    second = (rival, another, _value(rng, another, world))
                facts = [(entity, category, value), second,
                         (rng.choice([entity, rival, third]), other, _value(rng, other, world))]
                rng.shuffle(facts)
                context = " ".join(f"{e} {CLAUSES[c].format(v=v)}." for e, c, v in facts)
                question = q.format(e=entity)
                group.append({"dataset": "qa", "prompt": f"{context} {question}", "question": question,
                              "response": ANSWERS[category][i % 3].format(e=entity, v=value), "category": category,
                              "entity": entity, "fact": value, "keywords": [entity, value],
                              "distractor": rival_value})
            groups.append(group)
    return groups


# brainstorm with 3 or 4 items, compose with 3 (its letter frame is longer), explain compares two; prompt k
# is answered by response k % 2
ITEMS = {"compose": 3, "explain": 2}
HARD_INSTRUCT = {
    "brainstorm": (("List some ideas for {t} involving {items}.", "Brainstorm ways to get better at {t} using {items}.",
                    "Give me ideas about {t} that mention {items}."),
                   ("Here are some ideas for {t}. {tips}", "Ideas for {t}: {tips}")),
    "compose": (("Write a short note about {t} that mentions {items}.", "Compose a brief paragraph on {t} covering {items}.",
                 "Write a few friendly lines about {t} with {items}."),
                ("A quick note on {t}. {tips} Good luck!", "Dear friend, on {t}: {tips} Enjoy!")),
    "explain": (("Explain the roles of {items} in {t}.", "Compare the parts {items} play in {t}.",
                 "Why do {items} matter for {t}?"),
                ("About {t}: {tips}", "When it comes to {t}: {tips}")),
}


# the tiny preset writes at most ModelConfig.max_len = 64 tokens. With the tokenizer `prepare` trains on these
# sets, answers of up to 140 characters take at most 58 (`prepare` checks every record; a 140-character one
# took 67 tokens under another mix of QA text), so longer answers (most four-item brainstorms) are not drawn
MAX_RESPONSE_CHARS = 140

# the rival form of an instruction prompt: two people's lists of items, each from another topic, then a
# request for one person's items that names neither the items nor the topic
PEOPLE = ("Ana", "Ben", "Chloe", "Dev", "Eva", "Finn", "Gita", "Hugo", "Ines", "Jon", "Kira", "Liam")
RIVAL_LIST = "{p}'s list: {items}."
RIVAL_REQUEST = {"brainstorm": "List some ideas with the items on {p}'s list.",
                 "compose": "Write a short note that mentions the items on {p}'s list.",
                 "explain": "Explain the roles of the two items on {p}'s list."}


def _apart(one: tuple[str, list[str]], other: tuple[str, list[str]]) -> bool:
    """Do two (topic, tips) share no word between the items of one and the topic and tips of the other?
    Then an answer's required-item recall never counts the items of the wrong list."""
    def words(t, tips): return set(re.findall(r"\w+", " ".join([t, *tips]).lower()))
    def items(t, tips): return {w.lower() for w in _items(tips)}
    return not (items(*one) & words(*other) or items(*other) & words(*one))


def _items(tips: list[str]) -> list[str]:
    """A topic's items: the first word of each of its tips."""
    return [tip.split()[0] for tip in tips]


def _listing(words: list[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1]


def _said(tips: list[str], picks: tuple[int, ...]) -> str:
    return " ".join(f"{_cap(tips[i])}." for i in picks)


def _instruct(rng: random.Random) -> list[list[dict]]:
    """Instruction records grouped by topic × task, as the easy set: 144 groups of 34 or 35. Two thirds of
    the prompts list the items of two topics and ask for one of them (the rival form)."""
    per_group, extra = divmod(SIZES["instruct"], len(topics()) * len(HARD_INSTRUCT))
    groups = []
    for topic, tips in topics():
        items = _items(tips)
        others = [_items(ts) for t, ts in topics() if _apart((topic, tips), (t, ts))]
        for task, (prompts, responses) in HARD_INSTRUCT.items():
            fits = [(k, picks) for k in range(len(prompts)) for n in ((ITEMS[task],) if task in ITEMS else (3, 4))
                    for picks in permutations(range(5), n)
                    if len(responses[k % 2].format(t=topic, tips=_said(tips, picks))) <= MAX_RESPONSE_CHARS]
            group = []
            for i, (k, picks) in enumerate(rng.sample(fits, per_group + (len(groups) < extra))):
                chosen = [items[j] for j in picks]
                prompt, rival = prompts[k].format(t=topic, items=_listing(chosen)), None
                if i % 3:  # the rival form: the answer needs the asked person's items, and from them its topic
                    rival = rng.sample(rng.choice(others), len(chosen))
                    person, other = rng.sample(PEOPLE, 2)
                    lists = [(person, chosen), (other, rival)]
                    rng.shuffle(lists)
                    prompt = " ".join(RIVAL_LIST.format(p=p, items=_listing(w)) for p, w in lists) + " " + \
                        RIVAL_REQUEST[task].format(p=person)
                group.append({"dataset": "instruct", "prompt": prompt,
                              "response": responses[k % 2].format(t=topic, tips=_said(tips, picks)), "task": task,
                              "topic": topic, "required": chosen, "distractor": rival})
            groups.append(group)
    return groups


def generate(dataset: str, seed: int = 0) -> list[dict]:
    """All records of one hard data set in id order, each with its `split` (exactly 80/10/10)."""
    rng = random.Random(f"hard-{dataset}-{seed}")
    return assign_splits(_qa(rng) if dataset == "qa" else _instruct(rng), rng, f"hard-{dataset}")


def default_data(command: str | None) -> Path:
    """table1's default is this regime, with headroom above the SFT model; every other command's, the easy sets."""
    return HARD_DIR if command == "table1" else DATA_DIR


def default_run(size: str, data: Path) -> Path:
    """runs/<size>/, or runs/<size>-hard/ for this regime."""
    return Path("runs") / (size + "-hard" * (Path(data).resolve() == HARD_DIR.resolve()))


def write_all(root: Path = HARD_DIR, seed: int = 0) -> None:
    """(Re)write root/<dataset>/<split>.jsonl for both hard data sets, each file atomically."""
    synth.write_all(root, seed, generate)


if __name__ == "__main__":
    write_all()
    print(f"wrote {', '.join(f'{d}/{s}.jsonl' for d in DATASETS for s in SPLITS)} under {HARD_DIR}")
