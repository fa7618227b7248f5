"""`erasekit bench`: a declarative study (models x concepts x seeds, each audited with the same
settings and attacks) and its leaderboard, pooled from the result files.

A study file (YAML)::

    name: world-quick
    base: world:full                 # a model folder, or world:<variant>
    concepts: [red]
    seeds: [0, 1]
    models:
      original: original             # the base model itself
      never-learned: never-learned   # the concept's never-learned model (its spec names it)
      salun: {erase: salun}          # erased from the base (its presets apply), once per seed
      esd-fast: {erase: esd, set: {steps: 50}}
      resalign-over-salun: {erase: resalign, from: salun}   # erased from another row's model
      mine: {path: models/my-erased} # a folder as it is
      circle-after-red: {erase: salun, concept: circle, from: salun}  # another concept erased
      words-negative: {guide: {mode: negative-prompt}, from: salun}    # inference-time guidance
      cstar: {erase: negative-embedding, from: salun}
      cstar-sld: {guide: {mode: sld, sld: medium, embedding: cstar}, from: salun}
    audit: {n_per_prompt: 2, limit: 8}   # erasekit.audit's settings
    attacks: {finetune: {steps: 50, eval_every: 25}}
    compare: [[salun, original]]     # paired differences
    outputs: [kappa_final.immunization_ratio]   # erasekit.json training.outputs to tabulate
    masks: [[lcodec, salun]]         # SalUn-style masks of two rows compared, seed by seed

A ``guide`` row renders its ``from`` row's weights (linked, not copied) with a ``guidance.json``:
``mode`` negative-prompt or sld, ``concept`` the negative prompt / safety concept (default: the
concept's words), ``sld`` a preset or the five numbers, ``embedding`` a negative-embedding row
whose learned token becomes the concept (its own token; e.g. the c* of another model: transfer).

Every cell (concept, model, seed) goes through ``erasekit.erase`` and ``erasekit.audit`` (the
model as the audited role, no other role: each row is measured alone). Erased models are cached
under OUT/models by content (base content hash, concept spec hash, method, settings, seed and the
model it starts from), audits under OUT/cells with the key they were run with, so an
interrupted or extended study redoes only what changed; a finished cell of other settings
(another profile) is kept aside (``.seedN-KEY``) and comes back when asked for again. A cell
that fails is recorded as failed with its error, and the study goes on.
"""

from erasekit.bench.pooling import (
    SCHEMA,
    SCHEMA_VERSION,
    check_claim,
    leaderboard,
    paired_difference,
    paired_outcome_difference,
    pool,
    pool_curve,
    split_attack,
)
from erasekit.bench.render import metrics_table, render_html, render_markdown, write_leaderboard
from erasekit.bench.runner import Runner, plan_study, report, run_study
from erasekit.bench.study import ModelRow, Study, load_study

__all__ = [
    "metrics_table",
    "SCHEMA",
    "SCHEMA_VERSION",
    "ModelRow",
    "Runner",
    "Study",
    "check_claim",
    "leaderboard",
    "load_study",
    "paired_difference",
    "paired_outcome_difference",
    "plan_study",
    "pool",
    "pool_curve",
    "render_html",
    "render_markdown",
    "report",
    "run_study",
    "split_attack",
    "write_leaderboard",
]
