"""Running a study's cells (resumable, cached by content) and re-rendering its leaderboard."""

from __future__ import annotations

import hashlib
import json
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from erasekit.bench.pooling import leaderboard
from erasekit.bench.render import write_leaderboard
from erasekit.bench.study import ModelRow, Study, load_study, resolve_base
from erasekit.distributed import process_state
from erasekit.errors import ErasekitError, first_line
from erasekit.outputs import atomic_file, output_lock, write_json
from erasekit.provenance import machine


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _keep_aside(folder: Path, key: str) -> None:
    """Cells of other settings are kept, not overwritten: before a cell runs with ``key``, a
    finished cell in its folder with another key (another profile's audit or attacks, an
    earlier preset) moves to the hidden sibling ``.seedN-<its key>``, and a kept cell with
    ``key`` moves back, so profiles sharing a study folder reuse each other's cells."""
    import shutil

    state = process_state()
    if state.is_main_process:
        current = _record(folder)
        kept = folder.with_name(f".{folder.name}-{key}")
        if current is None or current.get("key") != key:
            if current is not None and current.get("status") == "ok":
                aside = folder.with_name(f".{folder.name}-{current['key']}")
                shutil.rmtree(aside, ignore_errors=True)
                folder.rename(aside)
            if _done(_record(kept), key):
                shutil.rmtree(folder, ignore_errors=True)  # a failed cell's leftovers
                kept.rename(folder)
    state.wait_for_everyone()


def _record(folder: Path) -> dict[str, Any] | None:
    path = folder / "cell.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _done(record: dict[str, Any] | None, key: str) -> bool:
    """Whether a cell record is a finished cell with ``key``."""
    return record is not None and record.get("key") == key and record.get("status") == "ok"


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists)."""
    return json.loads(json.dumps(value, default=str))


def _erased_with(folder: Path) -> dict[str, Any] | None:
    """The method configuration an erased model folder records, or None without a model."""
    manifest = folder / "erasekit.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text()).get("method", {}).get("config", {})


def _same_erasure(recorded: dict[str, Any], config) -> bool:
    """Whether a model erased with the ``recorded`` configuration is the one ``config`` (a
    method's dataclass) would erase. A setting the method gained since, absent from the record
    and at its default, counts as the same: a new option's default keeps the old behaviour."""
    current = _plain(asdict(config))
    default = _plain(asdict(type(config)()))
    if set(recorded) - set(current):
        return False
    return all(
        recorded[k] == v if k in recorded else v == default.get(k) for k, v in current.items()
    )


class _NotBuilt(Exception):
    """Planning only: a model the cell needs is not erased yet."""


class Runner:
    """Runs a study's cells into ``out`` (resumable) and writes its leaderboard; ``dry``: builds
    nothing (``plan``)."""

    def __init__(
        self, study: Study, out: str | Path, *, progress: bool = True, dry: bool = False
    ) -> None:
        self.study, self.out, self.progress, self.dry = study, Path(out), progress, dry
        self.base = resolve_base(study.base, study.source)
        if not self.base.exists():
            raise ErasekitError(f"base model not found: {self.base}")
        self.built: dict[tuple[str, str, int], tuple[Path, str]] = {}
        self.hashes: dict[Path, str] = {}

    def content_hash(self, path: Path) -> str:
        from erasekit.provenance import model_content_hash

        if path not in self.hashes:
            self.hashes[path] = model_content_hash(path)
        return self.hashes[path]

    def model(self, row: ModelRow, concept, seed: int) -> tuple[Path, str]:
        """The row's model folder for (concept, seed) and its content key; builds erasures."""
        from erasekit.api import erase, erase_config
        from erasekit.auditing import never_learned_model
        from erasekit.concepts import load_concept

        cached = self.built.get((row.name, concept.name, seed))
        if cached:
            return cached
        if row.kind == "original":
            path = self.base
        elif row.kind == "path":
            path = Path(str(row.path))
        elif row.kind == "never-learned":
            path = never_learned_model(concept)
            if path is None:
                raise ErasekitError(f"concept {concept.name!r} names no never-learned model")
        if row.kind not in ("erase", "guide"):
            if not path.exists():
                raise ErasekitError(f"{row.name}: model not found: {path}")
            result = (path, self.content_hash(path))
        else:
            if row.start:
                start_path, start_key = self.model(self.study.models[row.start], concept, seed)
            else:
                start_path, start_key = self.base, self.content_hash(self.base)
            if row.kind == "guide":
                result = self.guided(row, concept, seed, start_path, start_key)
            else:
                target = load_concept(row.concept) if row.concept else concept
                settings = {"seed": seed, **row.settings}
                parts = [start_key, target.sha256, row.method, row.settings, seed]
                n = process_state().num_processes
                if n > 1:  # the global batch grows with the processes: another model
                    parts.append(f"processes={n}")
                key = _key(*parts)
                folder = self.out / "models" / f"{row.name}-{concept.name}-seed{seed}-{key}"
                config = erase_config(str(row.method), target, settings)
                recorded = _erased_with(folder)
                if recorded is not None and not _same_erasure(recorded, config):
                    # the method's defaults (its world preset) changed since this model was
                    # erased: the full configuration joins the key, so it is erased again
                    key = _key(*parts, _plain(asdict(config)))
                    folder = folder.with_name(f"{row.name}-{concept.name}-seed{seed}-{key}")
                if _erased_with(folder) is None and self.dry:
                    raise _NotBuilt(row.name)
                if _erased_with(folder) is None:  # erase writes erasekit.json atomically
                    erase(start_path, target, str(row.method), folder, settings=settings,
                          cache_dir=self.out / "cache", progress=False)  # fmt: skip
                result = (folder, key)
        self.built[(row.name, concept.name, seed)] = result
        return result

    def guided(self, row: ModelRow, concept, seed: int, start: Path, start_key: str):
        """A guide row's folder: the start model's weights with the row's guidance.json."""
        from erasekit.guidance import read_guidance, write_guided_model

        guidance = {k: v for k, v in (row.guide or {}).items() if k != "embedding"}
        embedding = embedding_key = None
        if row.guide and row.guide.get("embedding"):
            name = row.guide["embedding"]
            source, embedding_key = self.model(self.study.models[name], concept, seed)
            learned = read_guidance(source)
            if learned is None or learned.embedding is None:
                raise ErasekitError(f"{row.name}: row {name!r} holds no learned embedding "
                                    "(a negative-embedding row does)")  # fmt: skip
            embedding = source / learned.embedding
            guidance = {"concept": learned.concept, **guidance, "embedding": learned.embedding}
        guidance.setdefault("concept", concept.phrase)
        key = _key(start_key, guidance, embedding_key)
        folder = self.out / "models" / f"{row.name}-{concept.name}-seed{seed}-{key}"
        if self.dry:  # written in moments when the cell runs
            return folder, key
        state = process_state()
        failed = None
        if state.is_main_process and not folder.is_dir():
            try:
                write_guided_model(start, folder, guidance, embedding)
            except ErasekitError as e:  # raised after the others stopped waiting for it
                failed = e
        state.wait_for_everyone()
        if failed is not None:
            raise failed
        if not folder.is_dir():
            raise ErasekitError(f"{row.name}: the guided model folder was not written")
        return folder, key

    def cells(self) -> list[tuple[Any, ModelRow, int]]:
        """Every cell as (concept, row, seed), in the study's order."""
        from erasekit.concepts import load_concept

        concepts = [load_concept(c) for c in self.study.concepts]
        return [(c, row, s) for c in concepts for s in self.study.seeds
                for row in self.study.models.values()]  # fmt: skip

    def cell_folder(self, concept, row: ModelRow, seed: int) -> Path:
        return self.out / "cells" / concept.name / row.name / f"seed{seed}"

    def plan(self) -> list[dict[str, Any]]:
        """What ``run`` would do for each cell, building and writing nothing: ``reuse`` (done
        with these settings), ``restore`` (kept aside by a run of other settings), ``audit``,
        ``erase + audit`` (a model it needs is not erased yet: ``needs`` names its row), or
        ``fails`` (its settings are refused: ``error``)."""
        rows = []
        for concept, row, seed in self.cells():
            entry = {"concept": concept.name, "row": row.name, "seed": seed}
            try:
                _, model_key = self.model(row, concept, seed)
            except _NotBuilt as missing:
                rows.append({**entry, "action": "erase + audit", "needs": str(missing)})
                continue
            except ErasekitError as e:  # as the run would record it
                rows.append({**entry, "action": "fails", "error": first_line(e)})
                continue
            key = self.cell_key(model_key, concept, seed)
            folder = self.cell_folder(concept, row, seed)
            kept = folder.with_name(f".{folder.name}-{key}")
            action = ("reuse" if _done(_record(folder), key)
                      else "restore" if _done(_record(kept), key) else "audit")  # fmt: skip
            rows.append({**entry, "action": action})
        return rows

    def cell_key(self, model_key: str, concept, seed: int) -> str:
        """A cell's key: its model, the concept spec, the audit, attacks, detectors and seed."""
        s = self.study
        return _key(model_key, concept.sha256, s.audit, s.attacks, s.detectors, seed)

    def cell(self, row: ModelRow, concept, seed: int, process: int | None = None) -> dict[str, Any]:
        """Build and audit one cell, or reuse it when its key is unchanged (``process``: the
        launch's process that runs it alone, recorded)."""
        from erasekit.api import audit
        from erasekit.detectors import DetectorOptions
        from erasekit.models import read_manifest

        folder = self.cell_folder(concept, row, seed)
        record_file = folder / "cell.json"
        try:
            path, model_key = self.model(row, concept, seed)
            key = self.cell_key(model_key, concept, seed)
            _keep_aside(folder, key)
            old = _record(folder)
            if _done(old, key):
                return {**old, "reused": True}  # (the flag is not written)
            started = time.perf_counter()
            audit(path, concept, folder / "audit", seed=seed, overwrite=True,
                  roles={"reference": None, "never-learned": None},
                  attacks=self.study.attacks or None, original=self.base, progress=False,
                  cache_dir=self.out / "cache",
                  detectors=DetectorOptions(**self.study.detectors),
                  invocation={"bench": {"study": self.study.source, "row": row.name,
                                        "concept": concept.name, "seed": seed}},
                  **self.study.audit)  # fmt: skip
            record = {"status": "ok", "key": key, "model": str(path),
                      "audit_wall_s": round(time.perf_counter() - started, 1)}  # fmt: skip
            if process is not None:
                record["process"] = process
            if row.kind == "erase":  # the erasure's own wall time, as its manifest records it
                record["erase_wall_s"] = read_manifest(path).get("wall_time_s")
        except Exception as e:  # recorded, and the study goes on (Ctrl-C still stops it)
            record = {"status": "failed", "error": f"{type(e).__name__}: {first_line(e)}",
                      "traceback": traceback.format_exc(limit=5)}  # fmt: skip
        state = process_state()
        if state.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_file(record_file) as tmp:
                write_json(tmp, {"row": row.name, "concept": concept.name, "seed": seed,
                                 **record})  # fmt: skip
        state.wait_for_everyone()
        return record

    def groups(self, cells: list) -> list[list[int]]:
        """The cells (by index) in groups one process runs together: a concept and seed's rows
        linked by ``from`` or a guide's embedding (their models are built from one another)."""
        rows = self.study.models
        root = {name: name for name in rows}

        def find(name: str) -> str:
            while root[name] != name:
                name = root[name]
            return name

        for row in rows.values():
            for other in (row.start, (row.guide or {}).get("embedding")):
                if other:
                    root[find(row.name)] = find(other)
        grouped: dict[tuple, list[int]] = {}
        for i, (concept, row, seed) in enumerate(cells):
            grouped.setdefault((concept.name, seed, find(row.name)), []).append(i)
        return list(grouped.values())

    def run(self, share: str = "cells") -> dict[str, Any]:
        """Run every cell (or reuse it). Under accelerate launch / torchrun, ``share="cells"``
        gives each process whole cells (claimed one group at a time, each run as on one process:
        the same models and numbers as a one-process run), ``"batches"`` runs every cell on all
        processes (the erasure data-parallel, the audit and its attacks sharing prompts)."""
        if share not in ("cells", "batches"):
            raise ErasekitError(f"share must be cells or batches, not {share!r}")
        state = process_state()
        main = state.is_main_process
        cells = self.cells()
        started = time.perf_counter()
        with output_lock(self.out, enabled=main):
            if state.num_processes > 1 and share == "cells":
                self.run_shared(cells, started)
            else:
                ran = 0  # cells this run worked on: the estimate's basis (reused cost nothing)
                for i, (concept, row, seed) in enumerate(cells, start=1):
                    record = self.cell(row, concept, seed)
                    ran += not record.get("reused")
                    if self.progress and main:
                        spent = time.perf_counter() - started
                        left = spent / ran * (len(cells) - i) if ran else None
                        self.say(f"[{i}/{len(cells)}]", concept, row, seed, record, spent, left)
            board = leaderboard(self.study, self.out)
            # this run only: cells reused from earlier runs cost nothing here (cells_wall_s
            # sums every cell's own erase and audit time)
            board["provenance"]["last_run_wall_s"] = round(time.perf_counter() - started, 1)
            board["provenance"]["last_run_processes"] = state.num_processes
            board["provenance"]["last_run_share"] = share if state.num_processes > 1 else None
            board["provenance"]["last_run_machine"] = machine()
            if main:
                write_leaderboard(board, self.out)
        return board

    def say(self, where: str, concept, row, seed, record, spent: float, left) -> None:
        """One progress line for a finished cell."""
        left_text = f"about {left:.0f} s left" if left is not None else "reused"
        status = "ok" if record["status"] == "ok" else f"FAILED ({record['error']})"
        print(f"bench: {where} {concept.name} {row.name} seed {seed}: {status}; {spent:.0f} s, "
              f"{left_text}", file=sys.stderr)  # fmt: skip

    def run_shared(self, cells: list, started: float) -> None:
        """Each process claims the next unclaimed group of cells (an atomic mkdir in a folder
        of this run) and runs its cells alone; a process out of groups waits on files, not on
        a collective (a study's cells take hours, and collectives time out)."""
        import shutil
        import tempfile

        from accelerate.utils import broadcast_object_list

        from erasekit.distributed import one_process

        state = process_state()
        me, n = state.process_index, state.num_processes
        claims = None
        if state.is_main_process:  # the lock is held: folders of earlier runs are stale
            self.out.mkdir(parents=True, exist_ok=True)
            for old in self.out.glob(".claims-*"):
                shutil.rmtree(old, ignore_errors=True)
            claims = tempfile.mkdtemp(prefix=".claims-", dir=self.out)
        claims = Path(broadcast_object_list([claims])[0])

        def count(prefix: str) -> int:
            return sum(1 for p in claims.iterdir() if p.name.startswith(prefix))

        ran = 0
        for j, group in enumerate(self.groups(cells)):
            try:
                (claims / f"group-{j}").mkdir()
            except FileExistsError:
                continue  # another process runs it
            for i in group:
                concept, row, seed = cells[i]
                with one_process():
                    record = self.cell(row, concept, seed, process=me)
                ran += not record.get("reused")
                (claims / f"cell-{i}").touch()
                if self.progress:
                    done, spent = count("cell-"), time.perf_counter() - started
                    left = spent / ran * (len(cells) - done) / n if ran else None
                    self.say(f"process {me}: [{done}/{len(cells)}]", concept, row, seed, record,
                             spent, left)  # fmt: skip
        (claims / f"finished-{me}").touch()
        while count("finished-") < n:
            time.sleep(1.0)
        (claims / f"seen-{me}").touch()
        if state.is_main_process:  # removed once no process reads it any more
            while count("seen-") < n:
                time.sleep(0.2)
            shutil.rmtree(claims, ignore_errors=True)


def report(out: str | Path) -> dict[str, Any]:
    """Re-pool and re-render the leaderboard of a study folder from its result files."""
    out = Path(out)
    record = out / "leaderboard.json"
    if not record.is_file():
        raise ErasekitError(f"no leaderboard.json in {out} (run 'erasekit bench run' first)")
    previous = json.loads(record.read_text())
    recorded = previous["study"]
    study = load_study(recorded["source"], recorded.get("profile"))
    cell_keys = previous.get("provenance", {}).get("cell_keys", {})
    with output_lock(out):  # not while a run moves cells
        for name, key in cell_keys.items():  # the run's cells back, where another run moved them
            _keep_aside(out / "cells" / name, key)
        stale = sorted(name for name, key in cell_keys.items()
                       if not _done(_record(out / "cells" / name), key))  # fmt: skip
        if stale:
            more = ", …" if len(stale) > 3 else ""
            raise ErasekitError(
                f"{out}: {len(stale)} cell(s) the leaderboard pooled are gone or were run again "
                f"with other settings ({', '.join(stale[:3])}{more}); run the study again "
                f"with 'erasekit bench run'"
            )
        board = leaderboard(study, out)
        last_run = ("last_run_wall_s", "last_run_processes", "last_run_share", "last_run_machine")
        for key in last_run:  # the last run's, kept
            if key in previous.get("provenance", {}):
                board["provenance"][key] = previous["provenance"][key]
        write_leaderboard(board, out)
    return board


def study_problems(study: Study) -> list[str]:
    """Every mistake a cell would meet, found before the first cell: concepts that do not
    load, unknown attacks or attack settings, erase settings a method rejects, missing models
    (a never-learned row on a concept that names none, a path row's folder)."""
    from erasekit.api import erase_config
    from erasekit.auditing import attack_configs, never_learned_model
    from erasekit.concepts import load_concept

    problems: list[str] = []

    def check(where: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ErasekitError as e:
            problems.append(f"{where}: {first_line(e)}")
            return None

    concepts = [c for c in (check(f"concept {n!r}", load_concept, n) for n in study.concepts) if c]
    for concept in concepts:
        for attack, settings in study.attacks.items():
            check(f"attack {attack!r}", attack_configs, {attack: settings}, None, concept)
        for row in study.models.values():
            where = f"model {row.name!r} on {concept.name}"
            if row.kind == "erase":
                spec = check(where, load_concept, row.concept) if row.concept else concept
                if spec is not None:
                    check(where, erase_config, str(row.method), spec, row.settings)
            elif row.kind == "never-learned" and never_learned_model(concept) is None:
                problems.append(f"{where}: the concept names no never-learned model")
            elif row.kind == "path" and not Path(str(row.path)).exists():
                problems.append(f"{where}: model not found: {row.path}")
    return list(dict.fromkeys(problems))


def checked_study(study: str | Path, profile: str | None = None) -> Study:
    """``load_study`` and ``study_problems``: the whole file checked, all its problems on one
    line."""
    loaded = load_study(study, profile)
    problems = study_problems(loaded)
    if problems:
        more = f"{len(problems)} problems: " if len(problems) > 1 else ""
        raise ErasekitError(f"{loaded.source}: {more}{'; '.join(problems)} (no cell was run)")
    return loaded


def plan_study(
    study: str | Path, out: str | Path, *, profile: str | None = None, share: str = "cells"
) -> list[dict[str, Any]]:
    """What ``run_study`` would do for each cell of a study in ``out`` (see ``Runner.plan``);
    nothing is built or written. Under a launch, ``share="cells"`` keys the models as each
    process builds them there: alone."""
    from erasekit.distributed import one_process

    runner = Runner(checked_study(study, profile), out, progress=False, dry=True)
    if share == "cells" and process_state().num_processes > 1:
        with one_process():
            return runner.plan()
    return runner.plan()


def run_study(
    study: str | Path,
    out: str | Path,
    *,
    profile: str | None = None,
    progress: bool = True,
    share: str = "cells",
) -> dict[str, Any]:
    """Run (or resume) a study file (or one of its profiles) into ``out``; returns the
    leaderboard document. ``share``: how the processes of a launch split the work (see
    ``Runner.run``)."""
    return Runner(checked_study(study, profile), out, progress=progress).run(share)
