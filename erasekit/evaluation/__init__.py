"""Generate -> detect -> per-sample records -> metrics with 95% intervals and definitions.

Every number erasekit reports is built here: images come from the one ``generate`` path, each
detector scores them (shared among the processes of an accelerate run, gathered on all), each
image becomes a sample record with its raw scores and protocol flags, and metrics aggregate
samples into value, interval, n and a full definition.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from erasekit.concepts import Concept, PromptSet
from erasekit.detectors import DetectorOptions, Protocol, build_detector
from erasekit.distributed import gather_shares, my_share, process_state, working_alone
from erasekit.errors import ErasekitError, first_line
from erasekit.provenance import sha256_bytes
from erasekit.sampling import SamplerSettings, generate
from erasekit.stats import bootstrap_interval, paired_difference, wilson_interval

BOOTSTRAP_RESAMPLES = 2000
RATE_INTERVAL = "Wilson score 95%"
MEAN_INTERVAL = f"percentile bootstrap 95% over prompts ({BOOTSTRAP_RESAMPLES} resamples, seed 0)"


# ----------------------------------------------------------------------------- judges


@dataclass
class Judges:
    """The detectors an evaluation runs: the concept's detector with its protocols (the first
    is the primary one) and, where CLIP weights are given, a CLIP scorer for utility."""

    concept: Any
    protocols: list[Protocol]
    clip: Any = None
    detectors: dict[str, Any] = field(default_factory=dict)
    # combined concepts: each part's judges by its name (these are the first part's)
    parts: dict[str, Judges] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        if self.parts:  # each part's detectors, named "<detector> (<part>)"
            return {f"{name} ({part})": d for part, judges in self.parts.items()
                    for name, d in judges.describe().items()}  # fmt: skip
        return {name: det.describe() for name, det in self.detectors.items()}

    def protocol_definitions(self) -> dict[str, Any]:
        """Protocol name -> definition; combined concepts: "<protocol> (<part>)"."""
        if self.parts:
            return {f"{name} ({part})": d for part, judges in self.parts.items()
                    for name, d in judges.protocol_definitions().items()}  # fmt: skip
        return {p.name: p.definition for p in self.protocols}

    def for_set(self, prompt_set: str) -> Judges:
        """Who judges a prompt set: a combined concept's ``<part>/<set>`` by that part's
        judges; any other set (e.g. the combined retain set) by these."""
        return self.parts.get(prompt_set.split("/", 1)[0], self)


def build_judges(concept: Concept, options: DetectorOptions) -> Judges:
    """Load every detector the concept needs (errors name the missing weights); for combined
    concepts, every part's."""
    if concept.parts:
        parts = {p.name: build_judges(p, options) for p in concept.parts}
        first = parts[concept.parts[0].name]
        return Judges(first.concept, first.protocols, first.clip, first.detectors, parts)
    spec = concept.detector
    detector = build_detector(spec["name"], options, spec)
    protocols = detector.protocols(spec)
    asked = spec.get("protocol")
    names = [p.name for p in protocols]
    if asked is not None and asked not in names:
        raise ErasekitError(f"{concept.name}: unknown {spec['name']} protocol {asked!r} (this"
                            f" concept's: {', '.join(names)})")  # fmt: skip
    if asked is not None:  # the asked protocol is the primary one
        protocols = sorted(protocols, key=lambda p: p.name != asked)
    clip = None
    if spec["name"] == "clip":
        clip = detector
    elif options.clip_weights:
        clip = build_detector("clip", options, {})
    detectors = {detector.name: detector}
    if clip is not None:
        detectors["clip"] = clip
    return Judges(detector, protocols, clip, detectors)


def score_images(
    records: list[dict[str, Any]], root: str | Path, detectors: dict[str, Any]
) -> list[dict[str, dict]]:
    """Raw scores of every detector for every record's image (``root / record["image"]``).

    Under accelerate each process scores every n-th image; the results are gathered in order.
    A detector that raises is an error, never a silent pass.
    """
    root = Path(root)
    mine = my_share(len(records))
    images = [Image.open(root / records[i]["image"]).convert("RGB") for i in mine]
    prompts = [records[i]["prompt"] for i in mine]
    per_detector = {}
    for name, det in detectors.items():
        try:
            per_detector[name] = det.score(images, prompts)
        except ErasekitError:
            raise
        except Exception as e:
            first = first_line(e, default="")
            raise ErasekitError(f"detector {name!r} failed: {type(e).__name__}: {first}") from e
        if len(per_detector[name]) != len(images):
            raise ErasekitError(f"detector {name!r} returned {len(per_detector[name])} records "
                                f"for {len(images)} images")  # fmt: skip
    scored = [(i, {n: per_detector[n][j] for n in detectors}) for j, i in enumerate(mine)]
    by_index = dict(gather_shares(scored))
    return [by_index[i] for i in range(len(records))]


# ----------------------------------------------------------------------------- samples


def evaluate_prompt_set(
    pipe,
    prompt_set: PromptSet,
    root: str | Path,
    folder: str,
    judges: Judges,
    *,
    model_path: str | Path | None,
    settings: SamplerSettings,
    n_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Render ``prompt_set`` into ``root/folder`` and return one sample record per image:
    generation record (image path relative to ``root``), raw ``scores`` per detector and the
    protocols' ``flags``."""
    root = Path(root)
    records = generate(pipe, prompt_set, root / folder, model_path=model_path, settings=settings,
                       n_per_prompt=n_per_prompt, seed=seed, batch_size=batch_size,
                       progress=progress)  # fmt: skip
    records = [{**r, "image": f"{folder}/{r['image']}"} for r in records]
    scores = score_images(records, root, judges.detectors)
    samples = []
    for rec, score in zip(records, scores, strict=True):
        raw = score[judges.concept.name]
        flags = {p.name: bool(p.flag(raw)) for p in judges.protocols}
        samples.append({**rec, "prompt_set": prompt_set.name, "scores": score, "flags": flags})
    return samples


class PromptJudge:
    """How an adversarial-prompt attack sees the audit: ``judge(pipe, indices, prompts)``
    renders each prompt (one image) with the seed and guidance the audit gives attack prompt
    ``indices[j]`` (so a pre-check and every attempt on prompt i share the initial noise),
    through the one generate path, scores it with the audit's detectors and returns the
    samples, each with ``flagged`` under the primary protocol. A prompt's latest image stays
    at ``folder/images/<index>.png``; earlier attempts are not kept. All processes judge
    together, or (inside ``one_process()``) each its own prompts."""

    def __init__(self, prompt_set: PromptSet, judges: Judges, root: str | Path, folder: str,
                 settings: SamplerSettings, seed: int, batch_size: int) -> None:  # fmt: skip
        from erasekit.sampling import plan_samples

        self.prompt_set, self.judges, self.settings = prompt_set, judges, settings
        self.root, self.folder = Path(root), folder
        self.seed, self.batch_size = seed, batch_size
        self.plan = plan_samples(prompt_set, settings, n_per_prompt=1, seed=seed)
        self.renders = 0
        self.rank = process_state().process_index
        self.attempts = {"together": 0, "alone": 0}  # scratch folder names

    def __call__(self, pipe, indices: list[int], prompts: list[str]) -> list[dict[str, Any]]:
        import shutil

        from erasekit.concepts import PromptEntry
        from erasekit.provenance import sha256_bytes

        entries = tuple(
            PromptEntry(prompt=p, id=self.plan[i]["prompt_id"], seed=self.plan[i]["seed"],
                        guidance=self.plan[i]["guidance"])
            for i, p in zip(indices, prompts, strict=True)
        )  # fmt: skip
        digest = sha256_bytes("\n".join(prompts).encode())
        attempt = PromptSet(self.prompt_set.name, "attack", "inline", digest, entries)
        # all processes judge together into one folder, or each alone into its own
        mode = "alone" if working_alone() else "together"
        tag = f"p{self.rank}-" if mode == "alone" else ""
        scratch = f"{self.folder}/attempt-{tag}{self.attempts[mode]:07d}"
        self.attempts[mode] += 1
        samples = evaluate_prompt_set(pipe, attempt, self.root, scratch, self.judges,
                                      model_path=None, settings=self.settings, n_per_prompt=1,
                                      seed=self.seed, batch_size=self.batch_size)  # fmt: skip
        state = process_state()
        primary = self.judges.protocols[0].name
        out = []
        for sample, i in zip(samples, indices, strict=True):
            image = f"{self.folder}/images/{i:05d}.png"
            out.append({**sample, "image": image, "prompt_index": i,
                        "flagged": sample["flags"][primary]})  # fmt: skip
        if state.is_main_process:  # of the processes that judged these prompts
            (self.root / self.folder / "images").mkdir(parents=True, exist_ok=True)
            for sample, o in zip(samples, out, strict=True):
                shutil.move(self.root / sample["image"], self.root / o["image"])
            shutil.rmtree(self.root / scratch)
        state.wait_for_everyone()
        self.renders += len(prompts)
        return out

    def flag_images(self, paths: list[Path], prompts: list[str]) -> list[bool]:
        """The primary protocol's flag for existing images (e.g. an attack's targets)."""
        records = [{"image": str(Path(p).resolve()), "prompt": q}
                   for p, q in zip(paths, prompts, strict=True)]  # fmt: skip
        scores = score_images(records, "/", self.judges.detectors)
        proto = self.judges.protocols[0]
        return [bool(proto.flag(s[self.judges.concept.name])) for s in scores]


# ----------------------------------------------------------------------------- metrics


def sampling_definition(samples: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """How the images behind a metric were made: sampler, steps, guidance, size, seeds."""
    first = samples[0]
    guidance = sorted({s["guidance"] for s in samples})
    return {
        "sampler": first["sampler"],
        "steps": first["steps"],
        "guidance": guidance[0] if len(guidance) == 1 else guidance,
        "eta": first["eta"],
        "image_size": [first["height"], first["width"]],
        "seeds": {
            "base_seed": seed,
            "n_per_prompt": max(s["k"] for s in samples) + 1,
            "rule": "the prompt file's seed + k, else sha256-derived from (base_seed, prompt, k)",
        },
    }


def make_metric(
    metric: str,
    values: list[tuple[int, float]],
    *,
    kind: str,
    higher_is_better: bool,
    prompt_set: PromptSet,
    definition: dict[str, Any],
    protocol: str | None = None,
) -> dict[str, Any]:
    """A metric record from (prompt_index, value) pairs: ``kind`` "rate" (0/1 values, Wilson
    interval) or "mean" (bootstrap over prompts)."""
    if not values:
        raise ErasekitError(f"metric {metric} on {prompt_set.name} has no images")
    n = len(values)
    total = sum(v for _, v in values)
    groups: dict[int, list[float]] = defaultdict(list)
    for i, v in values:
        groups[i].append(v)
    extra = {}
    if kind == "rate":
        low, high = wilson_interval(int(round(total)), n)
        interval = RATE_INTERVAL
        # each prompt's [hits, images]: what pooling over seeds resamples (prompts within seeds)
        extra["per_prompt"] = [[round(sum(groups[i]), 6), len(groups[i])] for i in sorted(groups)]
    else:
        low, high = bootstrap_interval(list(groups.values()), BOOTSTRAP_RESAMPLES, seed=0)
        interval = MEAN_INTERVAL
    return {
        "metric": metric,
        "prompt_set": prompt_set.name,
        "protocol": protocol,
        "value": round(total / n, 6),
        "ci95": [round(low, 4), round(high, 4)],
        "n_images": n,
        "n_prompts": len({i for i, _ in values}),
        "higher_is_better": higher_is_better,
        "definition": {**definition, "prompt_set": prompt_set.describe(), "interval": interval},
        **extra,
    }


def metric_key(metric: str, prompt_set: str, protocol: str | None = None) -> str:
    """``concept_rate/direct`` for a primary protocol, ``concept_rate[i2p-strict]/direct``."""
    return f"{metric}[{protocol}]/{prompt_set}" if protocol else f"{metric}/{prompt_set}"


def _retain_labels(judges: Judges) -> Callable[[dict[str, Any]], bool | None]:
    """For retain accuracy: sample -> correct, or None when the detector cannot judge it."""
    det = judges.concept
    if not hasattr(det, "retain_correct"):
        return lambda sample: None
    return lambda sample: det.retain_correct(sample["prompt"], sample["scores"][det.name])


def set_metrics(
    samples: list[dict[str, Any]],
    prompt_set: PromptSet,
    judges: Judges,
    *,
    seed: int,
    utility: bool,
    retain: bool = True,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Metrics of one model on one prompt set (concept rate under every protocol; on utility
    sets CLIP score and, unless ``retain`` is False (a caption set), retain accuracy) and
    detector breakdowns (e.g. NudeNet label counts)."""
    base = sampling_definition(samples, seed)
    det = judges.concept
    metrics: dict[str, dict[str, Any]] = {}
    breakdown: dict[str, Any] = {}
    for j, proto in enumerate(judges.protocols):
        key = metric_key("concept_rate", prompt_set.name, None if j == 0 else proto.name)
        definition = {
            "statistic": "share of images the protocol flags",
            "detector": det.name,
            "detector_version": det.version,
            "protocol": proto.definition,
            **base,
        }
        values = [(s["prompt_index"], float(s["flags"][proto.name])) for s in samples]
        metrics[key] = make_metric("concept_rate", values, kind="rate", higher_is_better=False,
                                   prompt_set=prompt_set, definition=definition,
                                   protocol=proto.name)  # fmt: skip
        if hasattr(det, "breakdown"):
            raw = [s["scores"][det.name] for s in samples]
            breakdown[proto.name] = det.breakdown(raw, proto.name)
    if not utility:
        return metrics, breakdown
    judge = _retain_labels(judges) if retain else (lambda sample: None)
    judged = []
    for s in samples:
        ok = judge(s)
        if ok is not None:
            s["retain_correct"] = bool(ok)  # per image: paired differences read it
            judged.append((s["prompt_index"], float(ok)))
    if judged:
        definition = {"statistic": "share of images judged correct", "rule": det.retain_rule,
                      "detector": det.name, "detector_version": det.version, **base}  # fmt: skip
        metrics[metric_key("retain_accuracy", prompt_set.name)] = make_metric(
            "retain_accuracy", judged, kind="rate", higher_is_better=True,
            prompt_set=prompt_set, definition=definition)  # fmt: skip
    if judges.clip is not None:
        values = [(s["prompt_index"], s["scores"]["clip"]["clip_score"]) for s in samples]
        definition = {"statistic": "mean CLIP score, 100 * max(cos(image, prompt), 0)",
                      "detector": "clip", "detector_version": judges.clip.version,
                      **base}  # fmt: skip
        metrics[metric_key("clip_score", prompt_set.name)] = make_metric(
            "clip_score", values, kind="mean", higher_is_better=True, prompt_set=prompt_set,
            definition=definition)  # fmt: skip
    return metrics, breakdown


PAIRED_DEFINITION = ("audited − role on the same images (matched by prompt set, prompt, k and "
                     "seed): mean of the per-image differences, percentile bootstrap 95% over "
                     f"prompts ({BOOTSTRAP_RESAMPLES} resamples, seed 0)")  # fmt: skip


def image_value(sample: dict[str, Any], metric: dict[str, Any]) -> float | None:
    """One image's value in ``metric`` (a record of ``set_metrics``): its protocol flag for a
    concept rate, its judgement for retain accuracy, its CLIP score; None when it has none."""
    name = metric["metric"]
    if name == "concept_rate":
        flag = sample.get("flags", {}).get(metric.get("protocol"))
        return None if flag is None else float(flag)
    if name == "retain_accuracy":
        ok = sample.get("retain_correct")
        return None if ok is None else float(ok)
    if name == "clip_score":
        return sample.get("scores", {}).get("clip", {}).get("clip_score")
    return None


def paired_differences(
    samples: list[dict[str, Any]], results: dict[str, dict[str, Any]], audited: str = "audited"
) -> dict[str, dict[str, Any]]:
    """For every other evaluated role (reference, never-learned, guidance baselines) and every
    per-image metric: audited − role on the same images, with a bootstrap interval over
    prompts. {role: {metric key: {"value", "ci95", "n_pairs"}}}."""
    by_role: dict[str, dict[tuple, dict[str, Any]]] = defaultdict(dict)
    for s in samples:
        if ":" not in s["model"]:  # "<attack>:<role>" images are compared in the attack's table
            by_role[s["model"]][(s["prompt_set"], s["prompt_index"], s["k"], s["seed"])] = s
    mine = by_role.get(audited, {})
    out: dict[str, dict[str, Any]] = {}
    for role, theirs in by_role.items():
        if role == audited or role not in results:
            continue
        for key, metric in results.get(audited, {}).items():
            if key not in results[role] or "prompt_set" not in metric:
                continue
            groups: dict[int, list[float]] = defaultdict(list)
            for match, sample in mine.items():
                other = theirs.get(match)
                if match[0] != metric["prompt_set"] or other is None:
                    continue
                a, b = image_value(sample, metric), image_value(other, metric)
                if a is not None and b is not None:
                    groups[match[1]].append(a - b)
            if groups:
                out.setdefault(role, {})[key] = paired_difference(
                    list(groups.values()), BOOTSTRAP_RESAMPLES, seed=0)  # fmt: skip
    return out


def union_metrics(
    samples: list[dict[str, Any]],
    sets: list[tuple[PromptSet, bool]],
    judges: Judges,
    *,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Combined concepts: for every set all parts have (``<part>/direct`` ...), the share of
    images that show the concept their prompt set is about, each judged by its part's
    detector and primary protocol, pooled over the parts: ``concept_rate/union/<set>``."""
    if not judges.parts:
        return {}
    by_name = {ps.name: ps for ps, _ in sets}
    names = list(judges.parts)
    suffixes = [k.split("/", 1)[1] for k in by_name if k.startswith(f"{names[0]}/")]
    out = {}
    for suffix in suffixes:
        keys = [f"{n}/{suffix}" for n in names]
        if not all(k in by_name for k in keys):
            continue
        values: list[tuple[int, float]] = []
        pooled: list[dict[str, Any]] = []
        parts: dict[str, Any] = {}
        offset = 0
        for name, key in zip(names, keys, strict=True):
            part = judges.parts[name]
            proto = part.protocols[0]
            mine = [s for s in samples if s["prompt_set"] == key]
            values += [(offset + s["prompt_index"], float(s["flags"][proto.name])) for s in mine]
            pooled += mine
            offset += len(by_name[key])
            parts[name] = {"prompt_set": key, "detector": part.concept.name,
                           "detector_version": part.concept.version,
                           "protocol": proto.definition}  # fmt: skip
        entries = tuple(e for k in keys for e in by_name[k].entries)
        digest = sha256_bytes("\n".join(by_name[k].sha256 for k in keys).encode())
        union = PromptSet(f"union/{suffix}", "union of " + ", ".join(keys), "union", digest,
                          entries)  # fmt: skip
        definition = {"statistic": "share of images that show the concept their prompt set is "
                      "about (each judged by that concept's detector and primary protocol), "
                      "pooled over the combined concepts", "parts": parts,
                      **sampling_definition(pooled, seed)}  # fmt: skip
        primaries = {judges.parts[n].protocols[0].name for n in names}
        protocol = primaries.pop() if len(primaries) == 1 else "primary of each concept"
        out[metric_key("concept_rate", union.name)] = make_metric(
            "concept_rate", values, kind="rate", higher_is_better=False, prompt_set=union,
            definition=definition, protocol=protocol)  # fmt: skip
    return out


# FID / KID: erasekit/evaluation/distribution.py
from erasekit.evaluation.distribution import (  # noqa: E402, F401 - re-exported
    BOOTSTRAP_IMAGES,
    DISTRIBUTION_INTERVAL,
    DISTRIBUTION_RESAMPLES,
    distribution_metrics,
)

__all__ = [
    "Judges",
    "PromptJudge",
    "build_judges",
    "distribution_metrics",
    "evaluate_prompt_set",
    "make_metric",
    "metric_key",
    "set_metrics",
    "score_images",
]
