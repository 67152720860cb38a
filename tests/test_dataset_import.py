"""rag-build-index --from-dataset: every source kind, row order, ids, search, --faiss-index, refusals, resume."""
from __future__ import annotations

from pathlib import Path

import datasets
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from index import dataset_import
from index.build_cli import main
from index.dataset_import import import_dataset
from index.dataset_sources import open_source
from index.manifest import IndexManifest
from index.passages import PassageStore
from index.retrieval import Retriever
from index.settings import IndexSettings
from rag_models.errors import InputError

N, D, K = 50, 16, 5


def _table(ids: list | None = None, embeddings: pa.Array | None = None) -> pa.Table:
    """N rows: title, text, embeddings (list<float32>, (N, D) normal draws), and ids if given."""
    vectors = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)  # (N, D)
    columns = {"title": [f"title {i}" for i in range(N)], "text": [f"text of passage {i}" for i in range(N)],
               "embeddings": embeddings if embeddings is not None else pa.array(list(vectors),
                                                                                type=pa.list_(pa.float32()))}
    if ids is not None:
        columns = {"id": ids, **columns}
    return pa.table(columns)


def _vectors(table: pa.Table) -> np.ndarray:
    """(N, D) float32 embeddings of a table."""
    return np.stack([np.asarray(row, dtype=np.float32) for row in table.column("embeddings").to_pylist()])


def _write_arrow(table: pa.Table, path: Path, *, stream: bool) -> Path:
    """An Arrow IPC file (or stream) of 9-row record batches."""
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa.ipc.new_stream(sink, table.schema) if stream else pa.ipc.new_file(sink, table.schema)
        with writer:
            for batch in table.to_batches(max_chunksize=9):
                writer.write_batch(batch)
    return path


def _write_parquet_dir(table: pa.Table, directory: Path) -> Path:
    """Two parquet files (rows 0-29, 30-49) of 7-row row groups; file names sort in row order."""
    directory.mkdir()
    pq.write_table(table.slice(0, 30), directory / "part-0.parquet", row_group_size=7)
    pq.write_table(table.slice(30), directory / "part-1.parquet", row_group_size=7)
    return directory


def _save_to_disk(table: pa.Table, directory: Path) -> datasets.Dataset:
    """As transformers' use_own_knowledge_dataset.py: embeddings a Sequence of float32; here in 3 data files."""
    features = datasets.Features({"title": datasets.Value("string"), "text": datasets.Value("string"),
                                  "embeddings": datasets.Sequence(datasets.Value("float32"))})
    dataset = datasets.Dataset.from_dict(table.to_pydict(), features=features)
    dataset.save_to_disk(str(directory), num_shards=3)
    return dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The same 50 rows in every source kind, and their (N, D) embeddings."""
    root = tmp_path_factory.mktemp("kb")
    table = _table()
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(_vectors(table).reshape(-1)), D)
    doubles = pa.array(_vectors(table).astype(np.float64).tolist(), type=pa.list_(pa.float64()))
    _save_to_disk(table, root / "saved")
    pq.write_table(_table(embeddings=doubles), root / "kb.parquet", row_group_size=8)
    return {
        "root": root, "vectors": _vectors(table),
        "save_to_disk": root / "saved",
        "parquet_file": root / "kb.parquet",
        "parquet_dir": _write_parquet_dir(table, root / "parquet"),
        "arrow_file": _write_arrow(_table(embeddings=fixed), root / "kb.arrow", stream=False),
        "arrow_stream": _write_arrow(table, root / "stream.arrow", stream=True),
    }


def _brute_force_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(B, k) rows of the k largest inner products, best first."""
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet_file", "parquet_dir", "arrow_file", "arrow_stream"])
def test_every_source_kind_keeps_rows_vectors_and_search(data, tmp_path, kind):
    index_dir = import_dataset(data[kind], tmp_path / "out", shard_size=16, progress=False)
    assert index_dir == tmp_path / "out" / "index"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["index", "passages"]  # shards cleaned up
    np.testing.assert_array_equal(np.load(index_dir / "vectors.npy"), data["vectors"])  # row r = dataset row r
    retriever = Retriever.from_dir(tmp_path / "out")
    queries = data["vectors"][[3, 41]] + 0.1  # (2, D)
    docs = retriever.retrieve(torch.from_numpy(queries), K)
    np.testing.assert_array_equal(docs.ids.numpy(), _brute_force_top_k(data["vectors"], queries, K))
    assert docs.titles[1][0] == f"title {int(docs.ids[1, 0])}"
    assert retriever.passages.ids([0, 49]) == ["0", "49"]  # no id column: the row numbers
    assert retriever.passages.texts([7]) == ["text of passage 7"]


def test_exact_factory_is_vectors_only_and_opens_with_the_torch_backend(data, tmp_path):
    import_dataset(data["parquet_dir"], tmp_path / "out", factory="exact", progress=False)
    names = sorted(p.name for p in (tmp_path / "out" / "index").iterdir() if not p.name.startswith("."))
    assert names == ["checksums.json", "manifest.json", "vectors.npy"]  # no index.faiss (and the file manifest)
    retriever = IndexSettings(path=str(tmp_path / "out"), factory=None, backend="torch").open()
    queries = data["vectors"][:4]  # (4, D)
    _, ids = retriever.index.search(queries, K)
    np.testing.assert_array_equal(ids, _brute_force_top_k(data["vectors"], queries, K))


@pytest.mark.parametrize("ids", [[f"doc-{N - i}" for i in range(N)], list(range(100, 100 + N))])
def test_id_column_gives_the_passage_ids(tmp_path, ids):
    pq.write_table(_table(ids=ids), tmp_path / "kb.parquet")
    import_dataset(tmp_path / "kb.parquet", tmp_path / "out", progress=False)
    store = PassageStore.open(tmp_path / "out" / "passages")
    assert store.ids(range(N)) == [str(pid) for pid in ids]
    assert store.row_of(str(ids[17])) == 17 and store.titles([17]) == ["title 17"]  # order kept


def test_faiss_index_of_the_dataset_is_reused(data, tmp_path):
    """The transformers script's index: IndexHNSWFlat(d, 128, inner product) through datasets, saved to a file."""
    dataset = datasets.load_from_disk(str(data["save_to_disk"]))
    dataset.add_faiss_index("embeddings", custom_index=faiss.IndexHNSWFlat(D, 128, faiss.METRIC_INNER_PRODUCT))
    dataset.get_index("embeddings").save(str(tmp_path / "kb_hnsw.faiss"))
    main(["--from-dataset", str(data["save_to_disk"]), "--out", str(tmp_path / "out"), "--faiss-index",
          str(tmp_path / "kb_hnsw.faiss"), "--no-progress"])
    assert IndexManifest.load(tmp_path / "out" / "index").factory == "imported:IndexHNSWFlat"
    retriever = IndexSettings(path=str(tmp_path / "out"), factory=None).open()
    queries = data["vectors"][[0, 9, 33]] + 0.05  # (3, D)
    _, want = faiss.read_index(str(tmp_path / "kb_hnsw.faiss")).search(queries, K)  # (3, K)
    np.testing.assert_array_equal(retriever.retrieve(torch.from_numpy(queries), K).ids.numpy(), want)
    with pytest.raises(InputError, match="index.factory=null"):
        IndexSettings(path=str(tmp_path / "out")).open()  # the default config expects a Flat index


def _flat(metric: int, vectors: np.ndarray, path: Path) -> Path:
    index = faiss.IndexFlatL2(vectors.shape[1]) if metric == faiss.METRIC_L2 else faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(path))
    return path


def test_unusable_faiss_files_are_refused(data, tmp_path):
    source, out = data["parquet_dir"], tmp_path / "out"
    l2 = _flat(faiss.METRIC_L2, data["vectors"], tmp_path / "l2.faiss")
    with pytest.raises(InputError, match=r"l2.faiss: this IndexFlatL2 ranks by L2 distance.*--factory"):
        import_dataset(source, out, faiss_index=l2, progress=False)
    fewer = _flat(faiss.METRIC_INNER_PRODUCT, data["vectors"][:40], tmp_path / "fewer.faiss")
    with pytest.raises(InputError, match="holds 40 vectors, the dataset has 50 rows"):
        import_dataset(source, out, faiss_index=fewer, progress=False)
    wider = _flat(faiss.METRIC_INNER_PRODUCT, np.hstack([data["vectors"]] * 2), tmp_path / "wide.faiss")
    with pytest.raises(InputError, match=r"part-0.parquet: row 0 of the dataset: embedding of 16 values, not 32 "
                       r"\(the dimension of .*wide.faiss\)"):
        import_dataset(source, out, faiss_index=wider, progress=False)
    shuffled = _flat(faiss.METRIC_INNER_PRODUCT, data["vectors"][::-1].copy(), tmp_path / "shuffled.faiss")
    with pytest.raises(InputError, match="its vector 0 is not row 0's embedding"):
        import_dataset(source, out, faiss_index=shuffled, progress=False)
    assert not (out / "index").exists()


def test_missing_column_lists_the_columns_found(tmp_path):
    pq.write_table(_table().drop_columns(["embeddings"]), tmp_path / "kb.parquet")
    with pytest.raises(InputError, match=r"kb.parquet: no column embeddings \(found: title, text\)"):
        import_dataset(tmp_path / "kb.parquet", tmp_path / "out", progress=False)


def _with_row(table: pa.Table, row: int, column: str, value) -> pa.Table:
    """``table`` with one value replaced."""
    values = table.column(column).to_pylist()
    values[row] = value
    return table.set_column(table.schema.get_field_index(column), column, pa.array(values, table.schema.field(
        column).type))


@pytest.mark.parametrize("column, value, problem", [
    ("embeddings", [1.0] * (D - 1), "embedding of 15 values, not 16 (like row 0, the first one read)"),
    ("embeddings", [float("nan")] * D, "NaN or inf in the embedding"),
    ("embeddings", None, "null embedding"),
    ("text", None, "null text"),
])
def test_bad_rows_are_refused_naming_file_and_row(tmp_path, column, value, problem):
    bad = _with_row(_table(), 37, column, value)
    _write_parquet_dir(bad, tmp_path / "kb")  # row 37 is row 7 of part-1.parquet
    with pytest.raises(InputError) as error:
        import_dataset(tmp_path / "kb", tmp_path / "out", shard_size=16, progress=False)
    assert str(error.value).startswith(f"{tmp_path / 'kb' / 'part-1.parquet'}: row 37 of the dataset "
                                       f"(row 7 of this file): {problem}")
    assert not (tmp_path / "out" / "index").exists() and not (tmp_path / "out" / "passages").exists()


def test_empty_id_is_refused_naming_the_row(tmp_path):
    ids = [f"p{i}" for i in range(N)]
    ids[12] = ""
    pq.write_table(_table(ids=ids), tmp_path / "kb.parquet")
    with pytest.raises(InputError, match=r"kb.parquet: row 12 of the dataset: empty id\. Give every row a unique"):
        import_dataset(tmp_path / "kb.parquet", tmp_path / "out", progress=False)


def test_hub_dataset_offline_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="cannot stream facebook/wiki_dpr from the Hugging Face hub: offline"):
        import_dataset("hf:facebook/wiki_dpr:psgs_w100.nq.no_index", tmp_path / "out", progress=False)


def test_hub_reader_streams_a_local_dataset(data, tmp_path):
    """hf:PATH goes through datasets' streaming reader; N is unknown there, so the store is built first."""
    assert open_source(f"hf:{data['parquet_dir']}").count is None
    import_dataset(f"hf:{data['parquet_dir']}", tmp_path / "out", shard_size=16, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "index" / "vectors.npy"), data["vectors"])
    assert PassageStore.open(tmp_path / "out" / "passages").titles([0, 49]) == ["title 0", "title 49"]


def test_killed_import_resumes_without_converting_finished_shards(data, tmp_path, monkeypatch):
    real_publish, real_matrix = dataset_import.publish_shard, dataset_import._embedding_matrix
    published: list[int] = []

    def dying_publish(directory, number, start, vectors):
        if published:
            raise KeyboardInterrupt("killed")
        published.append(number)
        return real_publish(directory, number, start, vectors)

    monkeypatch.setattr(dataset_import, "publish_shard", dying_publish)
    with pytest.raises(KeyboardInterrupt):
        import_dataset(data["arrow_stream"], tmp_path / "out", shard_size=16, progress=False)
    assert published == [0] and not (tmp_path / "out" / "index").exists()
    with pytest.raises(InputError, match="no manifest.json"):
        Retriever.from_dir(tmp_path / "out")
    converted: list[int] = []

    def counting_matrix(column, dim, origin):
        converted.append(len(column))
        return real_matrix(column, dim, origin)

    published.clear()
    monkeypatch.setattr(dataset_import, "publish_shard", lambda *args: published.append(args[1]) or real_publish(*args))
    monkeypatch.setattr(dataset_import, "_embedding_matrix", counting_matrix)
    import_dataset(data["arrow_stream"], tmp_path / "out", shard_size=16, progress=False)
    assert published == [1, 2, 3] and sum(converted) == N - 16  # shard 0 (rows 0-15) was not converted again
    import_dataset(data["arrow_stream"], tmp_path / "clean", shard_size=16, progress=False)
    for name in ("vectors.npy", "index.faiss"):
        assert (tmp_path / "out" / "index" / name).read_bytes() == (tmp_path / "clean" / "index" / name).read_bytes()
    assert PassageStore.open(tmp_path / "out" / "passages").checksum == \
        PassageStore.open(tmp_path / "clean" / "passages").checksum


def test_cli_rerun_is_up_to_date_and_another_factory_reuses_the_vectors(data, tmp_path, capsys, monkeypatch):
    argv = ["--from-dataset", str(data["save_to_disk"]), "--out", str(tmp_path / "out"), "--no-progress"]
    main(argv)
    assert "rag-build-index: 50 passages, dim 16, factory Flat" in capsys.readouterr().out
    manifest = IndexManifest.load(tmp_path / "out" / "index")
    assert (manifest.encoder, manifest.passages_path) == (f"precomputed:{data['save_to_disk']}", "../passages")
    monkeypatch.setattr(dataset_import, "_import_vectors", lambda *a, **k: pytest.fail("imported the vectors again"))
    main(argv)
    assert "is up to date" in capsys.readouterr().out
    main(argv + ["--factory", "HNSW8", "--encoder", "dpr-ctx"])
    manifest = IndexManifest.load(tmp_path / "out" / "index")
    assert (manifest.factory, manifest.encoder) == ("HNSW8", "dpr-ctx")
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "index" / "vectors.npy"), data["vectors"])


@pytest.mark.parametrize("argv, message", [
    (["--faiss-index", "x.faiss", "--passages", "p.tsv", "--encoder", "e"], "--faiss-index goes only with"),
    (["--passages", "p.tsv", "--from-dataset", "kb"], "argument --from-dataset: not allowed with argument --passages"),
    (["--from-dataset", "no/such/dir"], "no/such/dir: no such file or directory"),
])
def test_cli_errors_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"rag-build-index: error: {message}" in capsys.readouterr().err


def test_cli_import_refuses_torchrun(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        main(["--from-dataset", str(data["parquet_file"]), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "--from-dataset runs in one process" in capsys.readouterr().err


def test_out_built_from_another_dataset_is_refused(data, tmp_path):
    import_dataset(data["parquet_file"], tmp_path / "out", factory="exact", progress=False)
    with pytest.raises(InputError, match="holds a passage store built from another source"):
        import_dataset(data["arrow_file"], tmp_path / "out", factory="exact", progress=False)


def _ivf_pq(vectors: np.ndarray, path: Path) -> Path:
    """An inner-product IVF4,PQ4 file of ``vectors`` (codes only: reconstruct() is not the vectors)."""
    index = faiss.index_factory(vectors.shape[1], "IVF4,PQ4x4", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    faiss.write_index(index, str(path))
    return path


def test_an_ivf_pq_file_of_the_rows_in_another_order_is_refused(data, tmp_path):
    source, vectors = data["parquet_dir"], data["vectors"]
    with pytest.raises(InputError, match="sampled rows are not in the inverted list of their embedding"):
        import_dataset(source, tmp_path / "bad", faiss_index=_ivf_pq(vectors[::-1].copy(), tmp_path / "rev.faiss"),
                       progress=False)
    assert not (tmp_path / "bad" / "index").exists()
    import_dataset(source, tmp_path / "ok", faiss_index=_ivf_pq(vectors, tmp_path / "ok.faiss"), progress=False)
    assert IndexManifest.load(tmp_path / "ok" / "index").factory == "imported:IndexIVFPQ"


def test_files_with_and_without_an_id_column_are_refused(tmp_path):
    directory = tmp_path / "mixed"
    directory.mkdir()
    table = _table(ids=[f"d{i}" for i in range(N)])
    pq.write_table(table.slice(0, 20), directory / "part-0.parquet")
    pq.write_table(table.drop_columns(["id"]).slice(20), directory / "part-1.parquet")
    with pytest.raises(InputError, match="part-1.parquet: lacks an id column, unlike part-0.parquet"):
        import_dataset(directory, tmp_path / "out", progress=False)


def test_a_wrong_length_in_the_first_batch_names_what_it_was_compared_with(tmp_path):
    table = _with_row(_table(), 2, "embeddings", [1.0, 2.0, 3.0])
    pq.write_table(table, tmp_path / "kb.parquet")
    with pytest.raises(InputError, match=r"row 2 of the dataset: embedding of 3 values, not 16 \(like the first row "
                       r"read\)"):
        import_dataset(tmp_path / "kb.parquet", tmp_path / "out", progress=False)


def test_factory_that_cannot_fit_is_refused_before_any_shard(data, tmp_path):
    for factory, problem in [("IVF64,Flat", "64 IVF lists, but only 50 vectors"), ("PQ5", "subquantizers")]:
        with pytest.raises(InputError, match=problem):
            import_dataset(data["parquet_file"], tmp_path / factory, factory=factory, shard_size=16, progress=False)
        assert not list((tmp_path / factory / "shards").glob("shard_*.npy"))
