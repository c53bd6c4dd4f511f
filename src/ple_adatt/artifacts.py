"""Artifact contracts between stages: manifests, content hashes and atomic output directories.

Every artifact a stage writes is a directory holding its files and a ``manifest.json``:
schema version, artifact kind, producer stage and component version, config hash, input
hashes and creation time. A stage refuses an input whose kind or schema version it does
not know. Outputs are written into a temporary sibling directory and renamed into place
at the end, so a failed stage leaves nothing half-written behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1


class ArtifactError(ValueError):
    """An input artifact is missing, of the wrong kind or of an unknown schema version."""


def package_version() -> str:
    from . import __version__

    return __version__


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def path_sha256(path: str | Path) -> str:
    """Content hash of a file, or of a directory's files (relative names and bytes, sorted)."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(str(f.relative_to(p)).encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def git_commit(start: str | Path | None = None) -> str | None:
    """The git commit of the source tree: ``$PLE_ADATT_GIT_COMMIT`` when set (the images bake in
    the commit they were built from, ``make images``), else ``git rev-parse HEAD`` with a
    ``-dirty`` suffix when tracked files differ from it (untracked files do not count); None
    without either (a build from a tarball)."""
    env = os.environ.get("PLE_ADATT_GIT_COMMIT", "").strip()
    if env:
        return env
    import subprocess

    here = Path(start) if start else Path(__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:  # --no-optional-locks: never take index.lock from under a concurrent commit
            return subprocess.run(["git", "--no-optional-locks", *args], cwd=here, capture_output=True, text=True,
                                  timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None

    head = git("rev-parse", "HEAD")
    if head is None or head.returncode != 0 or not head.stdout.strip():
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = status is not None and status.returncode == 0 and bool(status.stdout.strip())
    return head.stdout.strip() + ("-dirty" if dirty else "")


def make_manifest(
    kind: str,
    stage: str,
    *,
    schema_version: int,
    config_hash: str | None = None,
    inputs: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "manifest_version": MANIFEST_SCHEMA_VERSION,
        "kind": kind,
        "schema_version": schema_version,
        "producer": {"stage": stage, "component_version": package_version(), "git_commit": git_commit()},
        "config_hash": config_hash,
        "inputs": inputs or {},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: Path, missing: str, error: type[Exception] = ArtifactError, fix: str = "") -> Any:
    """A JSON file an artifact holds: ``missing`` is the message when it is absent, and invalid
    JSON is named with its position (``fix`` appended to both)."""
    if not path.exists():
        raise error(missing + fix)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e}){fix}") from e


def read_manifest(directory: str | Path, kind: str, supported: tuple[int, ...]) -> dict[str, Any]:
    """Read and check an artifact manifest; raise ArtifactError naming the path and the fix."""
    d = Path(directory)
    m = d / MANIFEST
    if not d.exists():
        raise ArtifactError(f"{d}: {kind} artifact not found")
    man = read_json(m, f"{d}: no {MANIFEST}; this is not a {kind} artifact written by ple-adatt")
    if man.get("kind") != kind:
        raise ArtifactError(f"{m}: artifact kind is {man.get('kind')!r}, expected {kind!r}")
    if man.get("schema_version") not in supported:
        raise ArtifactError(
            f"{m}: {kind} schema_version {man.get('schema_version')!r} is not supported by this version "
            f"(reads {list(supported)}); rerun the producing stage with ple-adatt {package_version()}"
        )
    return man


def first_difference(a: Any, b: Any, key: str = "") -> str | None:
    """The first key (dotted, list indices in brackets) where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*a, *(k for k in b if k not in a)]:
            sub = f"{key}.{k}" if key else str(k)
            if k not in a or k not in b:
                return sub
            found = first_difference(a[k], b[k], sub)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = first_difference(x, y, f"{key}[{i}]")
            if found:
                return found
        return None
    return None if a == b else (key or "(the whole config)")


def _sha(h: Any) -> str | None:
    return str(h).removeprefix("sha256:") if h else None


VALIDATION_SCHEMAS = (1,)


def read_validation(directory: str | Path, *, data_hash: str | None, data_config: dict[str, Any] | None,
                    data_config_hash: str | None, this: str, fix: str | None = None,
                    error: type[Exception] = ArtifactError) -> tuple[dict[str, Any], dict[str, Any]]:
    """A validate-stage output as every consumer reads it: ``(manifest, availability)``.

    Refused (``error``, one line): a directory that is not a validation result, a missing or
    unreadable ``availability.json``, a result computed for another dataset than ``data_hash``,
    or under another data config than ``data_config_hash`` (``this`` names that config in the
    message; ``data_config``, its dict, lets the message name the first key that differs;
    ``fix`` says what to do, by default: pass the validation made with that config)."""
    d = Path(directory)
    man = read_manifest(d, "validation", VALIDATION_SCHEMAS)
    avail = read_json(d / "availability.json", f"{d}: availability.json is missing", error,
                      "; rerun `ple-adatt validate`")
    seen = _sha((man.get("inputs") or {}).get("data"))
    if data_hash and seen and seen != _sha(data_hash):
        raise error(f"{d}: the validation result was computed for a different dataset (hash {seen[:12]}, "
                    f"this dataset {_sha(data_hash)[:12]}); rerun `ple-adatt validate` on this data")
    seen_cfg = man.get("config_hash")
    if data_config_hash and seen_cfg != data_config_hash:
        validated = avail.get("config") if isinstance(avail.get("config"), dict) else {}
        src = validated.get("path") or "an unknown data config"
        if validated.get("overrides"):
            src += " with --set " + " ".join(map(str, validated["overrides"]))
        diff = (first_difference(validated["data_config"], data_config)
                if isinstance(validated.get("data_config"), dict) and data_config is not None else None)
        raise error(f"{d}: the validation result was computed under data config {src} (hash "
                    f"{str(seen_cfg)[:12]}), which differs from {this} (hash {data_config_hash[:12]}"
                    + (f", first at key `{diff}`" if diff else "") + "); "
                    + (fix or "pass the validation result made with that data config"))
    return man, avail


#: manifest kinds that may replace each other in one output directory (a validation that failed, then passed)
_KIND_FAMILY = {"validation_failed": "validation"}


def _read_manifest_quietly(directory: Path) -> dict[str, Any]:
    try:
        man = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return man if isinstance(man, dict) else {}


def _output_identity(man: dict[str, Any]) -> str | None:
    """What an output is, for replacing it: its kind, and a checkpoint's phase too."""
    kind = man.get("kind")
    if not isinstance(kind, str):
        return None
    kind = _KIND_FAMILY.get(kind, kind)
    return f"{man['phase']} {kind}" if kind == "checkpoint" and isinstance(man.get("phase"), str) else kind


def replace_refusal(out: Path, kind: str | None, *, phase: str | None = None,
                    writes: set[str] | None = None) -> str | None:
    """Why the existing directory ``out`` must not be replaced by an output of ``kind``, or None.

    An output directory is replaced whole, so only an empty directory or an earlier output of
    the same kind (its ``manifest.json`` says so; for a checkpoint, of the same ``phase``) that
    holds nothing but its own files (the manifest lists them; ``writes``: the names the new
    output writes) may be: never a directory of checkpoints, a run, another stage's output or
    files a user keeps there. ``kind`` None accepts an earlier output of any kind.
    """
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if not names:
        return None
    man = _read_manifest_quietly(out)
    seen = _output_identity(man)
    want = None if kind is None else _output_identity({"kind": kind, "phase": phase})
    wanted = f"an earlier {want} output" if want else "an earlier output of a stage"
    if seen is None:
        held = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        return f"holds {held}, which is not {wanted}"
    if want is not None and seen != want and not (phase is None and seen.endswith(f" {want}")):
        return f"holds a {seen} output (its manifest.json), not {wanted}"
    files = man.get("files")
    if not isinstance(files, (dict, list)):
        return None  # an output that does not list its files: the kind decides
    own = {MANIFEST, *files, *(writes or ())}
    extra = [n for n in names if n not in own]
    if extra:
        return (f"holds {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} besides an earlier "
                f"{seen} output, which the stage did not write")
    return None


def check_output_dir(out: str | Path, option: str = "--out", *, kind: str | None = None, phase: str | None = None,
                     inputs: tuple[str | Path | None, ...] = (), replaced: bool = True) -> Path:
    """Check that ``out`` can be written as an output directory; call it before the work.

    :func:`atomic_output_dir` needs ``out`` to be a directory or absent, its parent to be
    creatable, and the parent writable (the temporary sibling and the rename live there).
    An existing ``out`` is replaced whole, so it must be empty or an earlier output of ``kind``
    (:func:`replace_refusal`), and must not hold any of ``inputs``; ``replaced=False`` for a
    directory that outputs are written into, not replaced (``ple-adatt train``'s OUT).
    Raises ArtifactError naming ``option`` and the path, so a stage fails in a second
    instead of after hours of training.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{option} {out}: exists and is not a directory; pass a directory path")
    for given in inputs:
        if given is not None and is_within(Path(given), out):
            raise ArtifactError(f"{option} {out}: holds the input {given}, and the output directory is replaced "
                                "whole; pass another directory")
    if replaced and out.is_dir():
        why = replace_refusal(out, kind, phase=phase)
        if why:
            raise ArtifactError(f"{option} {out}: {why}; the output directory is replaced whole, so pass a new "
                                "directory" + (f" or an earlier {kind} output" if kind else ""))
    parent = out.absolute().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ArtifactError(f"{option} {out}: cannot create it: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "write in" if existing == parent else "create directories in"
        raise ArtifactError(f"{option} {out}: no permission to {what} {existing}")
    return out


def check_run_dir(out: str | Path, option: str = "--out", *, inputs: tuple[str | Path | None, ...] = ()) -> Path:
    """Check a directory that a stage writes its outputs into, keeping what else it holds
    (``ple-adatt train``'s OUT: OUT/phase1, OUT/phase2): it must not hold any of ``inputs``
    (``--out configs`` or ``--out data`` would scatter checkpoints among them) and must not be
    another stage's output (its manifest.json), which that stage could then no longer replace."""
    out = Path(out)
    for given in inputs:
        if given is not None and is_within(Path(given), out):
            raise ArtifactError(f"{option} {out}: holds the input {given}; give the run a directory of its own "
                                "(e.g. runs/train)")
    seen = _output_identity(_read_manifest_quietly(out)) if out.is_dir() else None
    if seen is not None:
        raise ArtifactError(f"{option} {out}: is a {seen} output (its manifest.json), not a run directory; give the "
                            "run a directory of its own (e.g. runs/train)")
    return check_output_dir(out, option, replaced=False)


def is_within(path: str | Path, parent: str | Path) -> bool:
    """``path`` is ``parent`` or lies below it (after resolving links)."""
    try:
        Path(path).resolve().relative_to(Path(parent).resolve())
        return True
    except ValueError:
        return False


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it replaces ``out``.

    On any exception the temporary directory is removed and ``out`` is left as it was. An
    existing ``out`` is replaced only when it is empty or an earlier output of the kind the new
    ``manifest.json`` names (:func:`replace_refusal`); otherwise ArtifactError, ``out`` untouched.
    """
    out = check_output_dir(out, "output directory", replaced=False)  # what it holds: checked at the end
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"output directory {out}: cannot create its parent ({e})") from e
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out}: output directory already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; artifacts are meant to be shared
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.is_dir():
        new = _read_manifest_quietly(tmp)  # the last guard: never replace what is not ours
        why = replace_refusal(out, new.get("kind"), phase=new.get("phase"),
                              writes={p.name for p in tmp.iterdir()})
        if why:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ArtifactError(f"output directory {out}: {why}; it was left as it was")
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
