"""Text for evaluation and calibration, prepared exactly as protocol.md says.

Named data sets are read from LOWBIT_DATA_DIR (a local mirror); without it,
they come from the Hugging Face hub through the optional `datasets` package.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import DataError


@dataclass(frozen=True)
class NamedDataset:
    local_file: str  # relative to LOWBIT_DATA_DIR
    hub: tuple[str, str | None, str, str]  # (path, config, split, text field)
    layout: str  # "wikitext" (lines -> paragraphs) or "documents" (one per line)


DATASETS: dict[str, NamedDataset] = {
    "wikitext2": NamedDataset(
        "wikitext-2-raw/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test", "text"), "wikitext"
    ),
    "c4": NamedDataset(
        "c4-sample/c4.utf8",
        ("allenai/c4", "en", "validation", "text"),
        "documents",
    ),
    "wikipedia": NamedDataset(
        "wikipedia-calibration/wiki.utf8",
        ("wikimedia/wikipedia", "20231101.en", "train", "text"),
        "documents",
    ),
}


def _join_wikitext(raw: str) -> str:
    lines = [line for line in raw.replace("\r\n", "\n").split("\n") if line.strip()]
    return "\n\n".join(lines)


def _join_documents(docs: list[str]) -> str:
    return "\n\n".join(d for d in docs if d.strip())


def _read_file(path: Path) -> str:
    """A .jsonl file gives its "text" fields as documents; anything else is plain text."""
    if path.suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise DataError(f"{path}:{lineno} is not a JSON object with a 'text' field; fix the line") from exc
        return _join_documents(docs)
    return path.read_text(encoding="utf-8")


def data_dir() -> Path | None:
    value = os.environ.get("LOWBIT_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(
            f"LOWBIT_DATA_DIR={value} is not a directory; point it at the folder of data sets "
            "(e.g. ../shared/data) or unset it"
        )
    return path


def load_text(source: str) -> str:
    """Text of a named data set (wikitext2, c4, wikipedia) or of a local .txt/.jsonl file."""
    if source in DATASETS:
        ds = DATASETS[source]
        root = data_dir()
        if root is not None:
            path = root / ds.local_file
            if not path.is_file():
                raise DataError(
                    f"data set {source!r} not found at {path}; put {ds.local_file} under "
                    "LOWBIT_DATA_DIR or fix the variable"
                )
            raw = path.read_text(encoding="utf-8")
            if ds.layout == "wikitext":
                return _join_wikitext(raw)
            return _join_documents(raw.split("\n"))
        return _load_from_hub(source, ds)

    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path)
    raise DataError(
        f"data source {source!r} is neither a named data set ({', '.join(sorted(DATASETS))}) "
        "nor an existing file; fix the name or path"
    )


def _load_from_hub(name: str, ds: NamedDataset) -> str:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"data set {name!r} needs LOWBIT_DATA_DIR (a local copy) or the hub: "
            "set LOWBIT_DATA_DIR, or pip install 'lowbit[hub]' on a machine with network access"
        ) from exc
    path, config, split, field = ds.hub
    try:
        rows = datasets.load_dataset(path, config, split=split, streaming=ds.layout == "documents")
        if ds.layout == "wikitext":
            return _join_wikitext("\n".join(rows[field]))
        docs = [row[field] for _, row in zip(range(5000), rows, strict=False)]
    except Exception as exc:  # network, auth, missing data set: all fixable by the user
        raise DataError(
            f"could not download data set {name!r} from the hub ({type(exc).__name__}); "
            "set LOWBIT_DATA_DIR to a local copy"
        ) from exc
    return _join_documents(docs)
