"""Traits: what a persona vector is extracted for, in the persona_vectors JSON format.

A trait file is a JSON object with the keys persona_vectors uses:

- ``instruction``: a list of ``{"pos": ..., "neg": ...}`` system-prompt instructions; ``pos`` elicits
  the trait, ``neg`` its absence. They become ``"You are a/an {trait} assistant. {pos}"`` and
  ``"You are a helpful assistant. {neg}"`` (:meth:`Trait.system_prompts`).
- ``questions``: user questions for the contrastive rollouts.
- ``eval_prompt``: the judge prompt, with ``{question}`` and ``{answer}`` placeholders; the judge
  answers with a number from 0 to 100, or ``REFUSAL``.

and, optionally, personacore's own keys: ``trait`` (the name), ``description`` (a paragraph),
``eval_questions`` (held-out questions, disjoint from ``questions``, for choosing and checking the
layer) and ``ab_items`` (``{"question", "trait_answer", "neutral_answer"}`` for judge-free
evaluation). Files without them (such as persona_vectors' own) load with empty lists / ``None``.

Built-in traits (:func:`traits`) live in ``personacore/extract/data/``; they were written for
personacore. ``Trait.load`` takes a built-in name or a path::

    import personacore as pc
    pc.traits()                                   # ['apathetic', 'evil', ...]
    t = pc.Trait.load("impolite")
    pos_sys, neg_sys = t.system_prompts(0)
    t2 = pc.Trait.load("extract/evil.json", eval_path="eval/evil.json")  # held-out from a 2nd file
    t3 = pc.Trait.load("persona_vectors/data_generation/trait_data_extract/evil.json")
    # ^ inside persona_vectors' trait_data_extract/ folder: trait_data_eval/evil.json is read too

A trait with no held-out questions at all can still be extracted and evaluated:
:meth:`Trait.held_out_split` sets aside a fixed, seeded :data:`HELD_OUT_FRACTION` of its own
questions (``pc.extract`` and ``pc.evaluate`` do this with a warning).

Every problem with a trait file raises :class:`TraitError` (a ``PersonacoreError`` and a
``ValueError``) whose message names the file and the problem.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from ..errors import InvalidInputError, PersonacoreError

__all__ = [
    "Trait",
    "TraitError",
    "traits",
    "BUILTIN_DIR",
    "HELD_OUT_FRACTION",
    "questions_and_held_out",
]

#: Folder holding the built-in trait files (``<name>.json``).
BUILTIN_DIR = Path(__file__).resolve().parent / "data"

#: Share of a trait's own questions set aside as held-out questions when it has none
#: (:meth:`Trait.held_out_split`).
HELD_OUT_FRACTION = 0.25

# persona_vectors keeps a trait's extraction and evaluation files in sibling folders of these names.
_PV_EXTRACT_DIR = "trait_data_extract"
_PV_EVAL_DIR = "trait_data_eval"

_AB_KEYS = ("question", "trait_answer", "neutral_answer")
# One pass over the template, as str.format would see it: escaped braces and our two fields.
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{question\}|\{answer\}")

PathLike = Union[str, "os.PathLike[str]"]


class TraitError(PersonacoreError, ValueError):
    """A trait that cannot be used: unknown built-in name, missing or malformed file, bad fields."""


def traits() -> List[str]:
    """The names of the built-in traits, sorted."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.json"))


def a_or_an(word: str) -> str:
    """The article persona_vectors puts before the assistant's name: ``"an"`` before a vowel letter."""
    return "an" if word[:1].lower() in ("a", "e", "i", "o", "u") else "a"


def _where(source: Optional[str]) -> str:
    return f"trait file {source}" if source else "trait"


def _check_text_list(value: Any, key: str, where: str, *, allow_empty: bool) -> List[str]:
    if not isinstance(value, list):
        raise TraitError(
            f"{where}: {key!r} must be a list of non-empty strings, got {type(value).__name__}"
        )
    if not value and not allow_empty:
        raise TraitError(f"{where}: {key!r} is empty: it must be a list of non-empty strings")
    for i, q in enumerate(value):
        if not isinstance(q, str) or not q.strip():
            got = repr(q) if isinstance(q, str) else type(q).__name__
            raise TraitError(
                f"{where}: {key}[{i}] must be a non-empty string, got {got} "
                f"({key!r} must be a list of non-empty strings)"
            )
    return list(value)


def _check_instructions(value: Any, where: str) -> List[Tuple[str, str]]:
    if not isinstance(value, list):
        raise TraitError(
            f'{where}: \'instruction\' must be a list of {{"pos": ..., "neg": ...}} pairs, '
            f"got {type(value).__name__}"
        )
    if not value:
        raise TraitError(
            f"{where}: 'instruction' is an empty list: it needs at least one "
            f'{{"pos": ..., "neg": ...}} pair'
        )
    out = []
    for i, pair in enumerate(value):
        if isinstance(pair, (list, tuple)) and len(pair) == 2:  # our own (pos, neg) tuples
            pair = {"pos": pair[0], "neg": pair[1]}
        if not isinstance(pair, Mapping):
            raise TraitError(
                f"{where}: instruction[{i}] must be an object with 'pos' and 'neg' strings, "
                f"got {type(pair).__name__}"
            )
        for k in ("pos", "neg"):
            if k not in pair:
                raise TraitError(
                    f"{where}: instruction[{i}] has no {k!r} key "
                    f"(each pair needs 'pos' and 'neg' strings)"
                )
            if not isinstance(pair[k], str) or not pair[k].strip():
                got = repr(pair[k]) if isinstance(pair[k], str) else type(pair[k]).__name__
                raise TraitError(
                    f"{where}: instruction[{i}][{k!r}] must be a non-empty string, got {got}"
                )
        out.append((pair["pos"], pair["neg"]))
    return out


def _placeholders(template: str) -> set:
    return {m.group(0) for m in _PLACEHOLDER.finditer(template)}


def _check_eval_prompt(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        got = repr(value) if isinstance(value, str) else type(value).__name__
        raise TraitError(f"{where}: 'eval_prompt' must be a non-empty string, got {got}")
    found = _placeholders(value)
    missing = [p for p in ("{question}", "{answer}") if p not in found]
    if missing:
        raise TraitError(
            f"{where}: 'eval_prompt' has no {' or '.join(missing)} placeholder "
            f"(it needs both {{question}} and {{answer}})"
        )
    return value


def _check_ab_items(value: Any, where: str) -> List[Dict[str, str]]:
    if not isinstance(value, list):
        raise TraitError(
            f"{where}: 'ab_items' must be a list of objects with "
            f"{', '.join(map(repr, _AB_KEYS))}, got {type(value).__name__}"
        )
    out = []
    for i, it in enumerate(value):
        if not isinstance(it, Mapping):
            raise TraitError(
                f"{where}: ab_items[{i}] must be an object with "
                f"{', '.join(map(repr, _AB_KEYS))}, got {type(it).__name__}"
            )
        for k in _AB_KEYS:
            if k not in it:
                raise TraitError(
                    f"{where}: ab_items[{i}] has no {k!r} key "
                    f"(each item needs {', '.join(map(repr, _AB_KEYS))})"
                )
            if not isinstance(it[k], str) or not it[k].strip():
                got = repr(it[k]) if isinstance(it[k], str) else type(it[k]).__name__
                raise TraitError(
                    f"{where}: ab_items[{i}][{k!r}] must be a non-empty string, got {got}"
                )
        out.append({k: it[k] for k in _AB_KEYS})
    return out


def _read_json(path: Path) -> Any:
    if not path.exists():
        raise TraitError(f"trait file {path} not found")
    if not path.is_file():
        raise TraitError(f"trait file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise TraitError(
            f"trait file {path} is not JSON: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    except OSError as e:
        raise TraitError(f"trait file {path} cannot be read: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TraitError(
            f"trait file {path} is not JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except RecursionError:  # json.loads of "[[[[..." a few thousand deep
        raise TraitError(f"trait file {path} is not a trait: JSON nested too deeply") from None


def _has_path_syntax(s: str) -> bool:
    return (
        os.sep in s
        or "/" in s
        or (os.altsep is not None and os.altsep in s)
        or s.lower().endswith(".json")
    )


def _sibling_eval_file(path: Path) -> Optional[Path]:
    """persona_vectors' evaluation file beside an extraction file:
    ``.../trait_data_extract/x.json`` -> ``.../trait_data_eval/x.json`` when it exists."""
    if path.parent.name != _PV_EXTRACT_DIR:
        return None
    sibling = path.parent.parent / _PV_EVAL_DIR / path.name
    return sibling if sibling.is_file() else None


def _pair(p: Any) -> Tuple[Any, Any]:
    """``(pos, neg)`` from a tuple or a ``{"pos", "neg"}`` mapping (hand-edited instructions)."""
    if isinstance(p, Mapping):
        return p.get("pos"), p.get("neg")
    pos, neg = p
    return pos, neg


@dataclass
class Trait:
    """A trait: instruction pairs, questions, a judge prompt, held-out questions and A/B items.

    ``instructions`` is a list of ``(pos, neg)`` string tuples; ``ab_items`` a list of dicts with
    ``question``, ``trait_answer`` and ``neutral_answer``. ``source`` is the file it was loaded from
    (``None`` for one built with :meth:`from_dict`); ``extra`` keeps unknown top-level keys so that
    :meth:`save` writes them back.
    """

    name: str
    instructions: List[Tuple[str, str]]
    questions: List[str]
    eval_prompt: str
    description: Optional[str] = None
    eval_questions: List[str] = field(default_factory=list)
    ab_items: List[Dict[str, str]] = field(default_factory=list)
    source: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls, d: Any, name: Optional[str] = None, *, source: Optional[PathLike] = None
    ) -> "Trait":
        """Build and validate a trait from a persona_vectors-format dict.

        ``name`` is used when ``d`` has no ``"trait"`` key (and overrides it when given).
        """
        src = None if source is None else str(source)
        where = _where(src)
        if not isinstance(d, Mapping):
            raise TraitError(
                f"{where}: must be a JSON object with 'instruction', 'questions' and "
                f"'eval_prompt', got {type(d).__name__}"
            )
        for key in ("instruction", "questions", "eval_prompt"):
            if key not in d:
                raise TraitError(
                    f"{where}: missing key {key!r} (a trait needs 'instruction', "
                    f"'questions' and 'eval_prompt')"
                )
        tname = name if name is not None else d.get("trait")
        if tname is None:
            raise TraitError(
                f"{where}: missing key 'trait' (the trait's name): add it or pass name="
            )
        if not isinstance(tname, str) or not tname.strip():
            got = repr(tname) if isinstance(tname, str) else type(tname).__name__
            raise TraitError(f"{where}: the trait name must be a non-empty string, got {got}")
        description = d.get("description")
        if description is not None and not isinstance(description, str):
            raise TraitError(
                f"{where}: 'description' must be a string, got {type(description).__name__}"
            )
        known = {
            "trait",
            "description",
            "instruction",
            "questions",
            "eval_prompt",
            "eval_questions",
            "ab_items",
        }
        return cls(
            name=tname.strip(),
            description=description,
            instructions=_check_instructions(d["instruction"], where),
            questions=_check_text_list(d["questions"], "questions", where, allow_empty=False),
            eval_prompt=_check_eval_prompt(d["eval_prompt"], where),
            eval_questions=_check_text_list(
                d.get("eval_questions", []), "eval_questions", where, allow_empty=True
            ),
            ab_items=_check_ab_items(d.get("ab_items", []), where),
            source=src,
            extra={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def load(cls, name_or_path: PathLike, eval_path: Optional[PathLike] = None) -> "Trait":
        """Load a built-in trait by name (see :func:`traits`) or a persona_vectors-format JSON file.

        A file without a ``"trait"`` key is named after its stem (``evil.json`` → ``evil``).
        ``eval_path``, if given, is a second trait file (e.g. persona_vectors'
        ``trait_data_eval/<trait>.json``) whose ``questions`` become the held-out ``eval_questions``.
        Without ``eval_path``, a file inside a folder named ``trait_data_extract`` whose own
        ``eval_questions`` are empty takes them from ``../trait_data_eval/<same file name>`` when
        that file exists (persona_vectors' layout), so its files load with held-out questions.
        """
        if isinstance(name_or_path, os.PathLike):
            path: Path = Path(name_or_path)
        elif isinstance(name_or_path, str):
            key = name_or_path.strip()
            builtins = traits()
            if _has_path_syntax(key):
                path = Path(key).expanduser()
            elif key.lower() in builtins:  # a bare name is a built-in first, then a file in the cwd
                path = BUILTIN_DIR / f"{key.lower()}.json"
            elif key and os.path.exists(key):
                path = Path(key)
            else:
                raise TraitError(
                    f"unknown built-in trait {name_or_path!r}: the built-ins are "
                    f"{', '.join(builtins)} (or pass a path to a .json trait file)"
                )
        else:
            raise TraitError(
                f"Trait.load takes a built-in trait name or a path, got {type(name_or_path).__name__}"
            )

        data = _read_json(path)
        name = data.get("trait") if isinstance(data, dict) else None
        trait = cls.from_dict(data, name=None if name is not None else path.stem, source=path)
        if eval_path is None and not trait.eval_questions:
            eval_path = _sibling_eval_file(path)
        if eval_path is not None:
            epath = Path(eval_path).expanduser()
            edata = _read_json(epath)
            ewhere = _where(str(epath))
            if not isinstance(edata, Mapping):
                raise TraitError(
                    f"{ewhere}: must be a JSON object with 'questions', got {type(edata).__name__}"
                )
            if "questions" not in edata:
                raise TraitError(
                    f"{ewhere}: missing key 'questions' (the held-out questions to merge)"
                )
            trait.eval_questions = _check_text_list(
                edata["questions"], "questions", ewhere, allow_empty=False
            )
        return trait

    # ---- output ------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """The persona_vectors-format dict, plus personacore's keys where they are set."""
        d: Dict[str, Any] = {"trait": self.name}
        if self.description is not None:
            d["description"] = self.description
        d["instruction"] = [dict(zip(("pos", "neg"), _pair(p))) for p in self.instructions]
        d["questions"] = list(self.questions)
        d["eval_prompt"] = self.eval_prompt
        if self.eval_questions:
            d["eval_questions"] = list(self.eval_questions)
        if self.ab_items:
            d["ab_items"] = [dict(it) for it in self.ab_items]
        for k, v in self.extra.items():
            d.setdefault(k, v)
        return d

    def save(self, path: PathLike) -> Path:
        """Write :meth:`to_dict` as UTF-8 JSON (readable by persona_vectors and by :meth:`load`)."""
        self.validate()
        p = Path(path).expanduser()
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(
            json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        return p

    def validate(self) -> "Trait":
        """Re-check the fields (after editing them by hand); raises :class:`TraitError`."""
        Trait.from_dict(self.to_dict(), source=self.source)
        return self

    # ---- use ---------------------------------------------------------------------------------
    def system_prompts(self, i: int, assistant_name: Optional[str] = None) -> Tuple[str, str]:
        """``(pos_system, neg_system)`` for instruction pair ``i``, formed as persona_vectors does:
        ``"You are a/an {name} assistant. {pos}"`` and ``"You are a helpful assistant. {neg}"``.

        ``assistant_name`` replaces the trait name in the positive prompt (persona_vectors'
        ``--assistant_name``).
        """
        if isinstance(i, bool) or not isinstance(i, int):
            raise InvalidInputError(f"instruction index must be an int, got {type(i).__name__}")
        n = len(self.instructions)
        if not -n <= i < n:
            raise InvalidInputError(
                f"instruction index {i} out of range: trait {self.name!r} has {n} pairs"
            )
        pos, neg = _pair(self.instructions[i])
        who = self.name if assistant_name is None else assistant_name
        return (
            f"You are {a_or_an(who)} {who} assistant. {pos}",
            f"You are {a_or_an('helpful')} helpful assistant. {neg}",
        )

    def held_out_split(
        self, fraction: float = HELD_OUT_FRACTION, seed: int = 0
    ) -> Tuple[List[str], List[str]]:
        """``(questions, held_out)``: the trait's own questions split in two, for a trait without
        ``eval_questions``.

        ``held_out`` has ``max(1, round(fraction * n))`` of the ``n`` questions, picked by a
        permutation seeded with ``seed`` (the same split on every run and machine), listed in their
        original order; ``questions`` keeps the rest, in order. Needs at least two questions.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise InvalidInputError(f"fraction must be a number in (0, 1), got {fraction!r}")
        if not 0.0 < float(fraction) < 1.0:
            raise InvalidInputError(f"fraction must be in (0, 1), got {fraction!r}")
        n = len(self.questions)
        if n < 2:
            raise TraitError(
                f"trait {self.name!r} has no evaluation questions and only {n} question: "
                "a held-out split needs at least 2 (add 'eval_questions' or more 'questions')"
            )
        k = min(n - 1, max(1, int(round(fraction * n))))
        chosen = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
        held_out = [q for i, q in enumerate(self.questions) if i in chosen]
        rest = [q for i, q in enumerate(self.questions) if i not in chosen]
        return rest, held_out

    def system_prompt_pairs(self) -> List[Tuple[str, str]]:
        """:meth:`system_prompts` for every instruction pair, in order."""
        return [self.system_prompts(i) for i in range(len(self.instructions))]

    def render_eval_prompt(self, question: str, answer: str) -> str:
        """The judge prompt with ``{question}`` and ``{answer}`` filled in (as ``str.format`` would,
        ``{{``/``}}`` becoming single braces), in one pass: braces inside the question or the
        answer are left alone."""
        values = {"{question}": str(question), "{answer}": str(answer), "{{": "{", "}}": "}"}
        return _PLACEHOLDER.sub(lambda m: values[m.group(0)], self.eval_prompt)

    def __repr__(self) -> str:
        return (
            f"Trait({self.name!r}, {len(self.instructions)} instruction pairs, {len(self.questions)} questions, "
            f"{len(self.eval_questions)} eval questions, {len(self.ab_items)} A/B items)"
        )


def questions_and_held_out(trait: Trait, purpose: str) -> Tuple[List[str], List[str]]:
    """``(questions, held_out)`` of ``trait``: its own lists, or, when it has no
    ``eval_questions``, :meth:`Trait.held_out_split` with a ``UserWarning`` that says so.

    ``purpose`` ends the warning's first sentence (e.g. ``"to choose the layer"``).
    """
    if trait.eval_questions:
        return list(trait.questions), list(trait.eval_questions)
    questions, held_out = trait.held_out_split()
    warnings.warn(
        f"trait {trait.name!r} has no evaluation questions: holding out {len(held_out)} of its "
        f"{len(trait.questions)} questions (a fixed {HELD_OUT_FRACTION:.0%} split, seed 0) "
        f"{purpose}; give the trait 'eval_questions' (or load persona_vectors' file from its "
        "trait_data_extract folder beside trait_data_eval) to use separate ones",
        UserWarning,
        stacklevel=3,
    )
    return questions, held_out
