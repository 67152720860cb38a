"""Datasets of passages with precomputed embeddings, read as Arrow record batches in row order.

`open_source(SRC)` understands four kinds of SRC:

    DIR with state.json        written by datasets' `Dataset.save_to_disk`: the data-*.arrow files (Arrow IPC
                               streams) in the order state.json lists them
    FILE.parquet, or DIR       a parquet file, or every *.parquet in DIR, sorted by name
    FILE.arrow, or DIR         Arrow IPC files, stream or file format (DIR: every *.arrow, sorted by name)
    hf:NAME[:CONFIG[:SPLIT]]   a dataset streamed by `datasets.load_dataset(NAME, CONFIG, split=SPLIT,
                               streaming=True)`, SPLIT defaulting to train (needs the network for the hub)

Files are read with plain reads, never memory-mapped (the pages of a mapped 70 GB file would stay in this
process's resident memory), parquet column chunks through a small buffer: RAM is bounded by a record batch
(parquet: _BATCH_ROWS rows; Arrow: the batches as the file stores them), not by the source.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from rag_models.errors import InputError
from rag_models.file_manifest import content_fingerprint

REQUIRED_COLUMNS = ("title", "text", "embeddings")
ID_COLUMN = "id"  # optional: passage ids are the row numbers without it
_BATCH_ROWS = 8192  # rows per record batch asked of parquet and the hub: 24 MB of 768-d float32
# Parquet column chunks are read through a 1 MB buffer, not whole: a 50k-row row group of 768-d embeddings
# read at once (pyarrow's default) took 0.9 GB; streamed, 0.2 GB whatever the row group size.
_PARQUET_BUFFER = 2**20
_ARROW_FILE_MAGIC = b"ARROW1"  # IPC file format; a stream starts with a message instead
_COLUMNS_FIX = ("The dataset needs columns title, text, embeddings (and optionally id), as transformers' "
                "use_own_knowledge_dataset.py writes them")


@dataclass(frozen=True)
class Batch:
    """Consecutive rows: ``data`` holds rows [row, row + n) of the dataset, rows [file_row, file_row + n) of ``where``.

    ``where`` names the file (or the hub dataset) the rows are in, for messages.
    """

    where: str
    file_row: int
    row: int
    data: pa.RecordBatch


@dataclass(frozen=True)
class DatasetSource:
    """An opened dataset: its kind, its files in row order and their row counts, its columns.

    Fields:
        label: SRC as the user gave it (messages, the default encoder name in the manifest).
        kind: "save_to_disk", "parquet", "arrow" or "hf".
        files: (path, rows) of every file in row order; empty for "hf".
        columns: the column names (of the first file; every file is checked for the required ones).
        count: N, the rows of all files; None for a hub dataset whose metadata does not say.
        hub: (name, config, split) for "hf", else None.
    """

    label: str
    kind: str
    files: tuple[tuple[Path, int], ...]
    columns: tuple[str, ...]
    count: int | None
    hub: tuple[str, str | None, str] | None = None

    def fingerprint(self) -> dict:
        """Kind plus every file's name, size and content hash (or the hub name, config, split): to notice a change."""
        if self.hub is not None:
            return {"kind": self.kind, "hub": list(self.hub)}
        return {"kind": self.kind, "files": [content_fingerprint(path) for path, _ in self.files]}

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """Record batches in row order from the one holding row ``start`` (it may begin earlier, never later).

        Only title, text, embeddings and id are read. Files wholly before ``start`` are skipped, and so are
        parquet row groups; Arrow batches and hub rows before it are read and left to the caller to drop.
        """
        wanted = [name for name in (*REQUIRED_COLUMNS, ID_COLUMN) if name in self.columns]
        if self.hub is not None:
            yield from _hub_batches(self.label, self.hub, wanted)
            return
        row = 0
        for path, rows in self.files:
            if row + rows > start:
                reader = _parquet_batches if self.kind == "parquet" else _arrow_batches
                for file_row, data in _reading(path, reader(path, max(start - row, 0), wanted)):
                    yield Batch(str(path), file_row, row + file_row, data)
            row += rows


def open_source(source: str | Path) -> DatasetSource:
    """Resolve SRC (see the module docstring) and check that every file has the required columns.

    Raises InputError for a path that does not exist, a directory with no dataset files, a
    DatasetDict directory, a file that is not parquet / Arrow, or a missing column.
    """
    label = str(source)
    if label.startswith("hf:"):
        return _open_hub(label)
    path = Path(source)
    if not path.exists():
        raise InputError("no such file or directory", path=path,
                         fix="Pass a save_to_disk directory, parquet / .arrow file(s) or hf:NAME[:CONFIG[:SPLIT]]")
    kind, paths = _dataset_files(path)
    reader = _parquet_info if kind == "parquet" else _arrow_info
    files, columns = [], ()
    for file in paths:
        try:
            names, rows = reader(file)
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(f"cannot read it as {'parquet' if kind == 'parquet' else 'Arrow IPC'} ({err})",
                             path=file, fix="Re-create the file; it is truncated or of another format") from None
        _check_columns(names, file)
        if files and (ID_COLUMN in names) != (ID_COLUMN in columns):
            raise InputError(f"{'has' if ID_COLUMN in names else 'lacks'} an id column, unlike {files[0][0].name}",
                             path=file, fix="Give every file of the dataset the same columns (all with id, or none)")
        files.append((file, rows))
        columns = columns or tuple(names)
    return DatasetSource(label=label, kind=kind, files=tuple(files), columns=columns,
                         count=sum(rows for _, rows in files))


def _dataset_files(path: Path) -> tuple[str, list[Path]]:
    """(kind, data files in row order) of a file or directory."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".parquet", ".arrow"):
            return suffix[1:], [path]
        raise InputError("unknown dataset file type", path=path,
                         fix="Pass a .parquet or .arrow file, or a directory written by Dataset.save_to_disk")
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise InputError(f"a DatasetDict (splits: {', '.join(splits)}), not one dataset", path=path,
                         fix=f"Pass one split's directory, e.g. {path / (splits[0] if splits else 'train')}")
    if (path / "state.json").is_file():
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        return "save_to_disk", [path / entry["filename"] for entry in state["_data_files"]]
    for kind in ("parquet", "arrow"):
        files = sorted(path.glob(f"*.{kind}"))
        if files:
            return kind, files
    raise InputError("no state.json, *.parquet or *.arrow files in this directory", path=path,
                     fix="Pass a directory written by Dataset.save_to_disk, or one of parquet or .arrow files")


def _check_columns(names: list[str], where: str | Path) -> None:
    """InputError naming the missing required columns and the ones found."""
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        raise InputError(f"no column {', '.join(missing)} (found: {', '.join(names) or 'none'})", path=where,
                         fix=_COLUMNS_FIX)


def _parquet_info(path: Path) -> tuple[list[str], int]:
    """(column names, rows) from the parquet footer."""
    file = pq.ParquetFile(path)
    return file.schema_arrow.names, file.metadata.num_rows


def _parquet_batches(path: Path, start: int, columns: list[str]) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(row in the file, batch) from the row group holding ``start`` on."""
    file = pq.ParquetFile(path, pre_buffer=False, buffer_size=_PARQUET_BUFFER)
    groups, first, row = [], None, 0
    for number in range(file.metadata.num_row_groups):
        rows = file.metadata.row_group(number).num_rows
        if row + rows > start:
            groups.append(number)
            first = row if first is None else first
        row += rows
    for data in file.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups, columns=columns):
        yield first, data
        first += data.num_rows


def _open_ipc(handle: pa.NativeFile) -> pa.ipc.RecordBatchFileReader | pa.ipc.RecordBatchStreamReader:
    """A reader for the IPC file format (magic ARROW1) or the stream format (what datasets writes)."""
    is_file = handle.read(len(_ARROW_FILE_MAGIC)) == _ARROW_FILE_MAGIC
    handle.seek(0)
    return pa.ipc.open_file(handle) if is_file else pa.ipc.open_stream(handle)


def _arrow_info(path: Path) -> tuple[list[str], int]:
    """(column names, rows) of an IPC file; mapped so counting touches only the batches' metadata."""
    with pa.memory_map(str(path)) as handle:
        reader = _open_ipc(handle)
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            rows = sum(reader.get_batch(number).num_rows for number in range(reader.num_record_batches))
        else:
            rows = sum(batch.num_rows for batch in reader)
        return reader.schema.names, rows


def _arrow_batches(path: Path, start: int, columns: list[str]) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(row in the file, batch) of an IPC file, read (not mapped) one batch at a time."""
    with pa.OSFile(str(path)) as handle:
        reader = _open_ipc(handle)
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            batches = (reader.get_batch(number) for number in range(reader.num_record_batches))
        else:
            batches = iter(reader)  # a stream: batch after batch until its end
        row = 0
        for data in batches:
            yield row, data.select(columns)
            row += data.num_rows


def _reading(path: Path, batches: Iterator[tuple[int, pa.RecordBatch]]) -> Iterator[tuple[int, pa.RecordBatch]]:
    """``batches``, with a read error turned into an InputError naming the file."""
    try:
        yield from batches
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"cannot read it ({err})", path=path,
                         fix="Re-create the file; it is truncated or was modified during the import") from None


def _open_hub(label: str) -> DatasetSource:
    """A streamed hub dataset: hf:NAME[:CONFIG[:SPLIT]]; refuses clearly when offline or unknown."""
    parts = label[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3 or any(not part for part in parts[1:]):
        raise InputError(f"cannot parse {label!r}", setting="--from-dataset",
                         fix="Write hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT, "
                         "e.g. hf:facebook/wiki_dpr:psgs_w100.nq.no_index")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else "train")
    dataset = _load_streaming(label, name, config, split)
    columns = tuple(dataset.column_names or ())  # () when the hub does not say: checked on the first batch
    if columns:
        _check_columns(list(columns), label)
    splits = dataset.info.splits or {}
    count = splits[split].num_examples if split in splits and splits[split].num_examples else None
    return DatasetSource(label=label, kind="hf", files=(), columns=columns, count=count, hub=(name, config, split))


def _load_streaming(label: str, name: str, config: str | None, split: str):
    """datasets.load_dataset(..., streaming=True), any failure as an InputError that says why."""
    import datasets  # only hub sources need it (slow to import)

    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # datasets raises ConnectionError, FileNotFoundError, ValueError, ... by cause
        if datasets.config.HF_HUB_OFFLINE:
            raise InputError(f"cannot stream {name} from the Hugging Face hub: offline mode is on "
                             f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not available locally ({err})",
                             setting="--from-dataset",
                             fix="Run where the hub is reachable with those variables unset, or save the dataset "
                             "there (Dataset.save_to_disk or to_parquet) and pass that directory") from None
        raise InputError(f"datasets cannot load {label} ({type(err).__name__}: {err})", setting="--from-dataset",
                         fix="Check the name, config and split on the hub page of the dataset") from None


def _hub_batches(label: str, hub: tuple[str, str | None, str], columns: list[str]) -> Iterator[Batch]:
    """Record batches of a streamed hub dataset (every row is streamed: the hub cannot seek)."""
    name, config, split = hub
    dataset = _load_streaming(label, name, config, split)
    if columns:
        dataset = dataset.select_columns(columns)
    row = 0
    for table in dataset.with_format("arrow").iter(batch_size=_BATCH_ROWS):
        if row == 0:
            _check_columns(table.schema.names, label)
        for data in table.to_batches():
            yield Batch(label, row, row, data)
            row += data.num_rows
