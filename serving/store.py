"""What a model store holds: each archive's model and version, and the one version per model a server loads.

A store may hold several versions of a model side by side (`digits archive --version`, `digits rollout`).
TorchServe 0.12.0 decides the default version of a model loaded at start-up by the order it registers the
archives in (`load_models=all` lists the folder in the file system's order; the `defaultVersion` of the
`models=` JSON is not read there: pytorch/serve#2744). So `digits serve` registers exactly one version per
model, the one the run folder's ledger says is live (serving/ledger.py), and the question never arises.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .archive import ArchiveError, read_manifest


@dataclass(frozen=True)
class StoredArchive:
    """One archive of a store: its file, and the model name and version its manifest gives."""

    path: Path
    model: str
    version: str


def list_archives(store: Path) -> list[Path]:
    store = Path(store)
    if not store.is_dir():
        raise ValueError(f"model store {store} does not exist; run `digits archive MODEL` first")
    archives = sorted(store.glob("*.mar"))
    if not archives:
        raise ValueError(f"model store {store} holds no .mar archives; run `digits archive MODEL` first")
    return archives


def describe_archive(mar: Path) -> StoredArchive:
    """The model name and version from `mar`'s manifest (the file's name says nothing binding)."""
    model = read_manifest(mar).get("model") or {}
    name, version = model.get("modelName"), model.get("modelVersion")
    if not isinstance(name, str) or not isinstance(version, str):
        raise ArchiveError(f"{mar}'s manifest names no model name and version; archive it again with `digits archive`")
    return StoredArchive(Path(mar), name, version)


def catalogue(store: Path) -> dict[str, dict[str, StoredArchive]]:
    """model -> version -> archive, for every archive of the store; two archives of one version are refused."""
    found: dict[str, dict[str, StoredArchive]] = defaultdict(dict)
    for mar in list_archives(store):
        try:
            stored = describe_archive(mar)
        except ArchiveError as err:
            raise ValueError(str(err)) from None
        twin = found[stored.model].get(stored.version)
        if twin is not None:
            raise ValueError(
                f"{twin.path.name} and {mar.name} both hold {stored.model} version {stored.version}; "
                "remove one of them from the store"
            )
        found[stored.model][stored.version] = stored
    return dict(found)


def choose_archives(store: Path, live: dict[str, str] | None = None) -> list[StoredArchive]:
    """The archive of each model a server should load: the version `live` names (the ledger's), else the
    model's only version. A model with several versions and no live one is refused, naming them."""
    live = live or {}
    chosen = []
    for model, versions in sorted(catalogue(store).items()):
        if model in live:
            if live[model] not in versions:
                raise ValueError(
                    f"the run folder's ledger says {model} version {live[model]} is live, but {store} holds only "
                    f"{', '.join(sorted(versions))}; put its archive back in the store (`digits versions {model}` "
                    "names the file)"
                )
            chosen.append(versions[live[model]])
        elif len(versions) == 1:
            chosen.extend(versions.values())
        else:
            names = ", ".join(f"{v} ({a.path.name})" for v, a in sorted(versions.items()))
            raise ValueError(
                f"{store} holds {model} versions {names} and no ledger names one live; serve one version per "
                f"model (move the others out of the store) and put new ones live with `digits rollout {model}`"
            )
    return chosen
