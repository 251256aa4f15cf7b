"""MeZO's task recipes: a prompt, the label words and the hyper-parameters of the MeZO paper's
runs (princeton-nlp/MeZO, large_models/: templates.py, the README's commands), by task name.

``zoplan run --recipe rte`` (``fine_tune(recipe="rte")``) reads each record's fields into the
recipe's prompt and scores its label words; an option given as well wins over the recipe's. The
hyper-parameters are those of MeZO's full-parameter runs: lr 1e-6 (the upper end of its grid; its
OPT-13B README uses 1e-7), eps 1e-3, 16 sequences a step; with ``--tuning lora`` or ``prefix``,
MeZO's rates for that adapter (zoplan.tuning). Small models often want more (SmolLM2-135M
learned a sentiment task at lr 1e-5): ``zoplan run`` says when the loss does not move.

Labels are SuperGLUE's (and GLUE's for SST-2) as integers: label i is the i-th word.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zoplan.errors import ZoplanError, did_you_mean
from zoplan.tuning import ADAPTER_EPS, ADAPTER_LR
from zoplan.vocab import Method

MEZO_LR = 1e-6
MEZO_EPS = 1e-3
MEZO_BATCH = 16


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str  # the records it expects: classification, choice or completion
    records: str  # what a record holds, for messages and docs
    prompt: str | None = None  # classification: the prompt, {field} for each record field
    label_words: tuple[str, ...] | None = None  # classification: one per label, each read after a space
    lr: float = MEZO_LR
    eps: float = MEZO_EPS
    global_batch: int = MEZO_BATCH


RECIPES = {
    r.name: r
    for r in (
        Recipe(
            "sst2",
            "classification",
            '{"sentence": ..., "label": 0|1} (0 negative, 1 positive)',
            "{sentence} It was",
            ("terrible", "great"),
        ),
        Recipe(
            "rte",
            "classification",
            '{"premise": ..., "hypothesis": ..., "label": 0|1} (0 entailment, 1 not entailment)',
            '{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
            ("Yes", "No"),
        ),
        Recipe(
            "cb",
            "classification",
            '{"premise": ..., "hypothesis": ..., "label": 0|1|2} (entailment, contradiction, neutral)',
            'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n',
            ("Yes", "No", "Maybe"),
        ),
        Recipe(
            "copa",
            "choice",
            '{"prompt": premise + " so" or " because", "choices": [" ...", " ..."], "label": 0|1}',
        ),
        Recipe(
            "squad",
            "completion",
            '{"prompt": "Title: ...\\nContext: ...\\nQuestion: ...\\nAnswer:", "completion": " ..."}',
        ),
    )
}


def recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ZoplanError(
            f"no recipe {name!r}" + did_you_mean(name, RECIPES),
            fix=f"the recipes are {', '.join(RECIPES)} (`zoplan recipes list` shows what each reads and trains with)",
        ) from None


def with_recipe(given: dict[str, Any]) -> dict[str, Any]:
    """``given`` (a run's options by configuration name) completed by its recipe, if it names one:
    what the user gave wins. Without a plan file the hyper-parameters come from the recipe too
    (a plan file fixes its own)."""
    name = given.get("recipe")
    if name is None:
        return given
    r = recipe(name)
    defaults: dict[str, Any] = {}
    if r.prompt is not None:
        defaults["prompt"] = r.prompt
    if r.label_words is not None:
        defaults["label_words"] = r.label_words
    if given.get("plan") is None:  # an adapter's rates are MeZO's for that adapter (zoplan.tuning)
        method = given.get("tuning", Method.FULL)
        lr, eps = (r.lr, r.eps) if method == Method.FULL else (ADAPTER_LR[method], ADAPTER_EPS[method])
        defaults.update(lr=lr, eps=eps, global_batch=r.global_batch)
    return {**defaults, **given}
