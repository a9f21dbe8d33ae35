"""Sequence tasks for the transformer family, generated locally (nothing is downloaded).

Each is a task factory (``task = "hposvc.sequences:NAME"`` in a spec, ``[task]`` options
as keywords) returning a ``multiclass`` :class:`~hposvc.tasks.Task` of family
``transformer``: inputs are ``(N, L)`` token ids (stored as floats, as every task's
inputs are) and the target is one token of the same vocabulary, so ``n_outputs`` is the
vocabulary size. The transformer reads the last position, so each sample is one
prediction: ``val_loss`` is the cross-entropy of that token and ``val_accuracy`` how
often the most likely token is right.

- :func:`char_lm`: a character-level language model. Text comes from a seeded
  generator: sentences of a small English-like grammar (determiners, adjectives, nouns,
  verbs, prepositional phrases), so spelling and word order are learnable and the next
  character is often, but not always, determined. A sample is ``context`` characters;
  the target is the next one. Windows do not overlap, so no validation text was seen in
  training.
- :func:`associative_recall`: ``pairs`` key-value pairs then a query key; the target is
  the value that followed that key (Ba et al. 2016; Olsson et al. 2022 use it to study
  induction heads). Keys in a sequence are distinct; chance is 1 / ``values``.

``data_seed`` draws the problem (the text, the sequences), ``seed`` the train/val/test
split (60/20/20), as for the survey's other generated tasks.

>>> task = char_lm(seed=0, n_samples=200)
>>> task.family, task.kind, task.input_shape, task.n_outputs
('transformer', 'multiclass', (16,), 28)
>>> decode(task.x_train[0])  # doctest: +SKIP
'uiet owl finds a'
>>> recall = associative_recall(seed=0, n_samples=100)
>>> recall.input_shape, recall.n_outputs
((13,), 32)
"""

from __future__ import annotations

import numpy as np

from hposvc.tasks import Task, _make, _split

__all__ = ["ALPHABET", "associative_recall", "char_lm", "decode", "grammar_text"]

ALPHABET = " .abcdefghijklmnopqrstuvwxyz"  # char_lm's vocabulary: token i is ALPHABET[i]

# The grammar's words. Sentences: DET [ADJ] NOUN VERB DET [ADJ] NOUN [PREP DET [ADJ] NOUN] "."
_DETS = ("the", "a", "every", "some", "my", "this", "no")
_ADJS = ("quiet", "red", "old", "small", "happy", "clever", "brown", "tired", "young", "bright")
_NOUNS = ("cat", "dog", "owl", "fox", "child", "teacher", "farmer", "river", "garden", "house", "boat", "letter")
_VERBS = ("sees", "finds", "likes", "follows", "paints", "visits", "carries", "watches", "builds", "remembers")
_PREPS = ("near", "under", "behind", "beside", "across", "inside")
_P_ADJ = 0.4  # a noun phrase has an adjective
_P_PREP = 0.5  # a sentence ends in a prepositional phrase


def _noun_phrase(rng: np.random.Generator) -> list[str]:
    words = [str(rng.choice(_DETS))]
    if rng.random() < _P_ADJ:
        words.append(str(rng.choice(_ADJS)))
    return [*words, str(rng.choice(_NOUNS))]


def grammar_text(n_chars: int, *, seed: int = 0) -> str:
    """At least ``n_chars`` characters of sentences from the grammar, drawn with ``seed``.

    >>> grammar_text(40, seed=1)[:40]  # doctest: +SKIP
    'the old fox paints some river near my bo'
    """
    rng = np.random.default_rng(seed)
    sentences: list[str] = []
    size = 0
    while size < n_chars:
        words = [*_noun_phrase(rng), str(rng.choice(_VERBS)), *_noun_phrase(rng)]
        if rng.random() < _P_PREP:
            words += [str(rng.choice(_PREPS)), *_noun_phrase(rng)]
        sentence = " ".join(words) + ". "
        sentences.append(sentence)
        size += len(sentence)
    return "".join(sentences)


def decode(ids) -> str:
    """char_lm token ids back to text."""
    return "".join(ALPHABET[int(i)] for i in ids)


def _name(fn: str) -> str:
    return f"{__name__}:{fn}"


def char_lm(*, seed: int = 0, n_samples: int = 4000, context: int = 16, data_seed: int = 0) -> Task:
    """Next character after ``context`` characters of grammar text; ``n_samples`` windows."""
    n_samples, context = int(n_samples), int(context)
    text = grammar_text(n_samples * (context + 1), seed=int(data_seed))
    lookup = {c: i for i, c in enumerate(ALPHABET)}
    ids = np.array([lookup[c] for c in text[: n_samples * (context + 1)]], dtype=np.int64).reshape(n_samples, context + 1)
    parts = _split(ids[:, :-1].astype(np.float32), ids[:, -1], seed, stratify=False)
    return _make(_name("char_lm"), "multiclass", "transformer", len(ALPHABET), parts, defaults_of="tabular")


def associative_recall(
    *, seed: int = 0, n_samples: int = 4000, pairs: int = 6, keys: int = 16, values: int = 16, data_seed: int = 0
) -> Task:
    """``pairs`` (key, value) tokens then a query key; the target is the query's value.
    Keys are tokens ``0 .. keys-1``, values ``keys .. keys+values-1``."""
    n_samples, pairs, keys, values = int(n_samples), int(pairs), int(keys), int(values)
    if pairs > keys:
        from hposvc.errors import invalid

        raise invalid("pairs", pairs, f"at most keys={keys}", source="task associative_recall", hint="Keys in a sequence are distinct.")
    rng = np.random.default_rng(int(data_seed))
    k = np.argsort(rng.random((n_samples, keys)), axis=1)[:, :pairs]  # distinct keys per sequence
    v = keys + rng.integers(0, values, size=(n_samples, pairs))
    asked = rng.integers(0, pairs, size=n_samples)
    seq = np.empty((n_samples, 2 * pairs + 1), dtype=np.int64)
    seq[:, 0:-1:2], seq[:, 1:-1:2] = k, v
    seq[:, -1] = k[np.arange(n_samples), asked]
    target = v[np.arange(n_samples), asked]
    parts = _split(seq.astype(np.float32), target, seed, stratify=False)
    return _make(_name("associative_recall"), "multiclass", "transformer", keys + values, parts, defaults_of="tabular")
