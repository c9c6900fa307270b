"""Synthetic tasks of the zoo: what a prompt looks like, its right answer, and a format-only answer.

Each task draws examples from a seeded `random.Random`. Two kinds, so that both lm-eval forms are used:

- `generate` tasks (`zoo_reverse`, `zoo_sort`) are scored with `generate_until` + `exact_match`;
- `choice` tasks (`zoo_translate`, `zoo_polarity`) are scored by log-likelihood over the choices (`acc`).

`format_answer` gives an answer of the right shape that ignores the prompt (a shuffle of the input letters,
random words, a random label). The base model is pre-trained on prompts with such answers: it learns every
task's format, alphabet and answer length but not the task, so it scores near chance and each expert's
fine-tuning is what adds the skill. Reversal and sorting read the same kind of input and disagree on the
output; translation and polarity share one made-up vocabulary: merged experts interfere.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import BaseModel, ConfigDict

TaskKind = Literal["generate", "choice"]


class Example(BaseModel):
    """One task item. `answer` is the right continuation of `prompt`; choice tasks also carry the options."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    answer: str
    choices: list[str] | None = None
    label: int | None = None


class TaskSpec(BaseModel):
    """Size knobs of the tasks: the letters and lengths of strings, the made-up vocabulary sizes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    letters: str
    min_len: int
    max_len: int
    n_words: int
    max_words: int
    n_polar_words: int


def _word_list(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """Distinct pronounceable three-letter words (consonant, vowel, consonant) not already in `taken`."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: list[str] = []
    while len(words) < count:
        word = rng.choice(consonants) + rng.choice(vowels) + rng.choice(consonants)
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


class TaskSet:
    """The four zoo tasks for one size and seed. The made-up vocabularies are drawn from `seed`."""

    names = ("zoo_reverse", "zoo_sort", "zoo_translate", "zoo_polarity")
    kinds: dict[str, TaskKind] = {
        "zoo_reverse": "generate",
        "zoo_sort": "generate",
        "zoo_translate": "choice",
        "zoo_polarity": "choice",
    }

    def __init__(self, spec: TaskSpec, seed: int) -> None:
        self.spec = spec
        rng = random.Random(f"vocabulary-{seed}")
        taken: set[str] = set()
        source = _word_list(rng, spec.n_words, taken)
        target = _word_list(rng, spec.n_words, taken)
        self.dictionary = dict(zip(source, target))
        self.positive = _word_list(rng, spec.n_polar_words, taken)
        self.negative = _word_list(rng, spec.n_polar_words, taken)

    def sample(self, name: str, rng: random.Random) -> Example:
        """Draw one example of task `name`."""
        return getattr(self, f"_sample_{name.removeprefix('zoo_')}")(rng)

    def format_answer(self, name: str, example: Example, rng: random.Random) -> str:
        """An answer with the task's shape that does not depend on what the prompt asks."""
        if name in ("zoo_reverse", "zoo_sort"):
            letters = list(example.answer)
            rng.shuffle(letters)
            return "".join(letters)
        if name == "zoo_translate":
            targets = sorted(self.dictionary.values())
            return " ".join(rng.choice(targets) for _ in example.answer.split())
        return rng.choice(["pos", "neg"])

    def _letters(self, rng: random.Random) -> str:
        # distinct letters: sorting then has one right answer without counting duplicates
        length = rng.randint(self.spec.min_len, self.spec.max_len)
        return "".join(rng.sample(self.spec.letters, length))

    def _sample_reverse(self, rng: random.Random) -> Example:
        text = self._letters(rng)
        return Example(prompt=f"rev:{text}=", answer=text[::-1])

    def _sample_sort(self, rng: random.Random) -> Example:
        text = self._letters(rng)
        return Example(prompt=f"srt:{text}=", answer="".join(sorted(text)))

    def _sample_translate(self, rng: random.Random) -> Example:
        source = sorted(self.dictionary)
        words = [rng.choice(source) for _ in range(rng.randint(2, self.spec.max_words))]
        right = [self.dictionary[w] for w in words]
        options = {" ".join(right)}
        targets = sorted(self.dictionary.values())
        while len(options) < 4:  # distractors: one word mistranslated
            wrong = list(right)
            position = rng.randrange(len(wrong))
            wrong[position] = rng.choice([t for t in targets if t != right[position]])
            options.add(" ".join(wrong))
        choices = sorted(options)
        rng.shuffle(choices)
        answer = " ".join(right)
        return Example(prompt=f"tr:{' '.join(words)}=", answer=answer, choices=choices, label=choices.index(answer))

    def _sample_polarity(self, rng: random.Random) -> Example:
        count = rng.choice([3, 5])
        n_positive = rng.randint(0, count)
        words = [rng.choice(self.positive) for _ in range(n_positive)]
        words += [rng.choice(self.negative) for _ in range(count - n_positive)]
        rng.shuffle(words)
        answer = "pos" if 2 * n_positive > count else "neg"
        choices = ["pos", "neg"]
        return Example(prompt=f"pol:{' '.join(words)}=", answer=answer, choices=choices, label=choices.index(answer))


def draw_splits(tasks: TaskSet, name: str, sizes: dict[str, int], seed: int) -> dict[str, list[Example]]:
    """Draw examples with distinct prompts and deal them into splits (e.g. test, validation, train).

    Prompts are unique across all splits, so evaluation never sees an item the experts were tuned on and
    validation (the search's fitness) never overlaps test. Refuses sizes the task's prompt space cannot
    fill rather than looping forever.
    """
    rng = random.Random(f"{name}-{seed}")
    wanted = sum(sizes.values())
    seen: dict[str, Example] = {}
    misses = 0
    while len(seen) < wanted:
        example = tasks.sample(name, rng)
        if example.prompt in seen:
            misses += 1
            if misses > 50 * wanted:
                raise ValueError(f"task {name} has fewer than {wanted} distinct prompts at this size")
            continue
        seen[example.prompt] = example
    examples = list(seen.values())
    splits: dict[str, list[Example]] = {}
    start = 0
    for split, size in sizes.items():
        splits[split] = examples[start : start + size]
        start += size
    return splits
