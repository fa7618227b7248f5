"""Every registered method proves it erases: on ShapesWorld, at a small budget, it lowers red
on a fixed prompt set against the original and keeps the retain set (other colours and shapes)
within a stated bound. A new method appears here as a row by itself and fails until it is given
a budget that shows it erasing. Budgets and bounds are fixed, with margin, from measured runs
(docs/testing.md gives the numbers); they are smoke budgets, not presets."""

from __future__ import annotations

import pytest

import erasekit
from erasekit.methods import METHODS

CONCEPT = "red"
# the fixed prompt set: the first 8 direct and 8 retain prompts, 2 images each, seed 5
EVALUATION = {"sets": ["direct", "retain"], "limit": 8, "n_per_prompt": 2, "seed": 5}

# method -> (settings, highest red rate after, lowest retain accuracy after)
BUDGETS: dict[str, tuple[dict, float, float]] = {
    "uce": ({}, 0.4, 0.6),
    # UCE's preset edit followed by one adversarial round, which costs retain accuracy
    "rece": ({"epochs": 1, "select": "last"}, 0.3, 0.2),
    "speed": ({"tokens": "all"}, 0.5, 0.6),
    "mace": ({"lr": 1e-2, "lam": 1.0, "preserve_scale": 1.0}, 0.5, 0.75),
    # ESD's world conventions, a short run with the attack from step 10
    "advunlearn": (
        {
            "steps": 40,
            "warmup": 10,
            "lr": 1e-4,
            "ddim_steps": 10,
            "attack_steps": 5,
            "negative_guidance": 3.0,
            "target": "diffusers-code",
        },
        0.3,
        0.7,
    ),  # fmt: skip
    "esd": ({"steps": 30, "lr": 2e-4, "ddim_steps": 10}, 0.5, 0.6),
    "salun": ({"steps": 24, "lr": 1e-4, "batch_size": 8, "images_per_prompt": 2}, 0.3, 0.75),
    # c* as a negative prompt costs retain accuracy on this world (negative-embedding-world)
    "negative-embedding": ({"steps": 60, "original": "world"}, 0.8, 0.3),
    # the negated task vector costs retain accuracy on this world (erase-world, negmerge-world)
    "negmerge": ({"grid": "lr=1e-3", "copy_steps": 20, "alpha": 0.5}, 0.3, 0.35),
    # its full objective (resilience term on), SalUn's surrogate loss as the base
    "resalign": (
        {"steps": 40, "base": "salun", "configs_per_step": 1, "fixed_point_iterations": 1},
        0.6,
        0.8,
    ),  # fmt: skip
    # the condition-number regularisers on the text encoder over the base alone (lam 0); they
    # cost retain accuracy on this world (immunize-world: 0.51)
    "immunize": (
        {
            "steps": 40,
            "base": "salun",
            "lam": 0.0,
            "configs_per_step": 1,
            "fixed_point_iterations": 1,
        },
        0.6,
        0.3,
    ),  # fmt: skip
}


def _rates(model) -> tuple[float, float]:
    metrics = erasekit.evaluate(model, CONCEPT, **EVALUATION)
    return metrics["concept_rate/direct"]["value"], metrics["retain_accuracy/retain"]["value"]


@pytest.fixture(scope="module")
def original() -> tuple[float, float]:
    from erasekit.world import world_path

    red, retain = _rates(world_path("full"))
    assert red >= 0.9 and retain >= 0.9  # the original draws red and keeps the others
    return red, retain


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS.names())
def test_method_lowers_red_and_keeps_the_retain_set(method, original, tmp_path):
    from erasekit.world import world_path

    assert method in BUDGETS, f"{method}: give it a world budget that shows it erasing"
    settings, red_bound, retain_bound = BUDGETS[method]
    settings = {k: (str(world_path("full")) if v == "world" else v) for k, v in settings.items()}
    out = erasekit.erase(world_path("full"), CONCEPT, method, tmp_path / "erased",
                         settings=settings, progress=False)  # fmt: skip
    red, retain = _rates(out)
    assert red <= red_bound and red <= original[0] - 0.4, (method, red, original)
    assert retain >= retain_bound, (method, retain, original)
