"""Small data sets made on this machine, written in the formats users bring (a ``save_to_disk`` folder with an audio
column, a text file), so the real loading path runs without a download.

- :func:`spoken_digits`: clips of one to three "spoken" digit words, each word a voiced sound with its own pair of
  formants and pitch contour (a crude vowel synthesiser), with the transcript ("three one four").
- :func:`short_stories`: lines of simple English built from a small grammar (subjects, verbs, objects, places).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

__all__ = ["spoken_digits", "short_stories", "WORDS"]

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# (first formant, second formant) in Hz per word: distinct vowel-like colours
_FORMANTS = ((300, 2300), (600, 1000), (350, 800), (400, 2000), (500, 900), (700, 1800), (450, 2500), (650, 1300),
             (550, 2100), (750, 1150))


def _word(index: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    seconds = 0.18 + 0.06 * rng.random()
    t = np.arange(int(seconds * rate)) / rate
    pitch = (110 + 40 * rng.random()) * (1 + 0.1 * np.sin(2 * np.pi * 3 * t))  # a gliding voice
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    f1, f2 = _FORMANTS[index]
    wave = np.zeros_like(t)
    for harmonic in range(1, 30):  # harmonics of the voice, weighted by two formant resonances
        freq = harmonic * pitch
        gain = np.exp(-((freq - f1) / 120.0) ** 2) + 0.6 * np.exp(-((freq - f2) / 180.0) ** 2)
        wave += gain * np.sin(harmonic * phase)
    envelope = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.02)  # 20 ms fade in and out
    return (wave * envelope).astype(np.float32)


def spoken_digits(path: str, num_clips: int = 256, sampling_rate: int = 16000, seed: int = 0,
                  max_words: int = 3) -> str:
    """Write ``num_clips`` clips to ``path`` (``datasets.Dataset.save_to_disk``: an ``audio`` column of
    ``{"array", "sampling_rate"}`` and a ``text`` column) unless a data set is already there; returns ``path``."""
    import datasets

    if os.path.exists(os.path.join(path, "state.json")):
        return path
    rng = np.random.default_rng(seed)
    audio, text = [], []
    for _ in range(num_clips):
        words = rng.integers(0, 10, size=int(rng.integers(1, max_words + 1)))
        pieces = [np.zeros(int(0.05 * sampling_rate), np.float32)]
        for w in words:
            pieces += [_word(int(w), sampling_rate, rng), np.zeros(int((0.04 + 0.04 * rng.random()) * sampling_rate),
                                                                   np.float32)]
        clip = np.concatenate(pieces)
        clip += 0.01 * rng.standard_normal(len(clip)).astype(np.float32)  # a little room noise
        audio.append({"array": clip, "sampling_rate": sampling_rate})
        text.append(" ".join(WORDS[int(w)] for w in words))
    features = datasets.Features({"audio": {"array": datasets.Sequence(datasets.Value("float32")),
                                            "sampling_rate": datasets.Value("int32")},
                                  "text": datasets.Value("string")})
    tmp = f"{path}.tmp-{os.getpid()}"
    datasets.Dataset.from_dict({"audio": audio, "text": text}, features=features).save_to_disk(tmp)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        os.rename(tmp, path)
    except OSError:  # another process wrote it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


_SUBJECTS = ("the cat", "a small dog", "the old man", "my sister", "the robot", "a bird", "the teacher", "our team")
_VERBS = ("found", "carried", "painted", "lost", "watched", "built", "opened", "shared")
_OBJECTS = ("a red box", "the big ball", "an old map", "a warm cake", "the blue door", "a tiny key", "the green kite")
_PLACES = ("in the park", "at school", "by the river", "under the tree", "in the kitchen", "on the hill", "at night")
_ENDINGS = ("and smiled.", "and went home.", "and told everyone.", "and laughed.", "and sat down.", "again.")


def short_stories(path: str, num_lines: int = 2000, seed: int = 0, sentences: tuple[int, int] = (2, 5),
                  rng: Optional[np.random.Generator] = None) -> str:
    """Write ``num_lines`` short stories (one per line) to the text file ``path`` unless it exists; returns
    ``path``."""
    if os.path.exists(path):
        return path
    rng = rng or np.random.default_rng(seed)

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    lines = []
    for _ in range(num_lines):
        story = []
        for _ in range(int(rng.integers(sentences[0], sentences[1] + 1))):
            sentence = f"{pick(_SUBJECTS)} {pick(_VERBS)} {pick(_OBJECTS)} {pick(_PLACES)} {pick(_ENDINGS)}"
            story.append(sentence[0].upper() + sentence[1:])
        lines.append(" ".join(story))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
