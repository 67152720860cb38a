"""`rag-export-index`: an index directory -> a knowledge base in transformers' custom-index format.

    rag-export-index runs/demo-<time>/index --out hf/kb
    rag-export runs/demo-<time>/rag_sequence/model --out hf/rag --knowledge hf/kb

OUT gets what transformers' `use_own_knowledge_dataset.py` writes, which its
``RagRetriever`` opens with ``index_name="custom"``:

    OUT/dataset       `Dataset.save_to_disk`: id, title, text, embeddings (row r = our row r)
    OUT/index.faiss   the index's own faiss file (an inner-product index over rows 0..N-1);
                      for an exact (torch) index, a faiss IndexFlatIP of the vectors

It is the mirror of `rag-build-index --from-dataset` (index/dataset_import.py): exporting and
importing again gives the same rows, ids, texts and vectors. The dataset is written through
`datasets` one row at a time (about 20k rows/s here): fine for millions of passages; for the
21M of Wikipedia, transformers' own `wiki_dpr` already exists. Written atomically.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
from datasets import Dataset, Features, Sequence, Value
from tqdm import tqdm

from index.manifest import FAISS_NAME, IDS_NAME, IndexManifest, open_passages, open_vectors
from index.retrieval import resolve_index_dir
from rag_models.atomic import atomic_directory
from rag_models.cli_errors import command
from rag_models.errors import InputError
from rag_models.transformers_rag import KNOWLEDGE_DATASET, KNOWLEDGE_FAISS

_BATCH = 4096
_FEATURES = Features({"id": Value("string"), "title": Value("string"), "text": Value("string"),
                      "embeddings": Sequence(Value("float32"))})


def _rows(store, vectors: np.ndarray, progress: bool) -> Iterator[dict]:
    """One dict per passage, in row order; vectors read batch by batch from the memmap."""
    count = vectors.shape[0]
    with tqdm(total=count, desc="export rows", unit=" psg", unit_scale=True, disable=not progress) as bar:
        for start in range(0, count, _BATCH):
            rows = np.arange(start, min(count, start + _BATCH))
            block = np.asarray(vectors[start:rows[-1] + 1], dtype=np.float32)  # (b, D)
            for pid, title, text, vector in zip(store.ids(rows), store.titles(rows), store.texts(rows), block):
                yield {"id": pid, "title": title, "text": text, "embeddings": vector}
            bar.update(len(rows))


def export_knowledge_dataset(index_dir: str | Path, out: str | Path, *, progress: bool = True) -> Path:
    """Write the index at ``index_dir`` (a rag-build-index output or its index/) as a transformers KB at ``out``.

    Returns ``out``. Raises InputError when the directory is not an index, has no passage store, or maps
    rows to custom ids (transformers reports dataset rows), or when ``out`` exists (it is never replaced).
    """
    directory = resolve_index_dir(index_dir)
    manifest = IndexManifest.load(directory)
    if (directory / IDS_NAME).is_file():
        raise InputError("this index maps its rows to custom ids; transformers' RagRetriever reports dataset rows",
                         path=directory, fix="rebuild the index without custom ids (rag-build-index does so)")
    store = open_passages(directory, manifest)
    if store is None:
        raise InputError("the index has no passage store to export", path=directory,
                         fix="keep the passage store beside the index as rag-build-index writes it")
    vectors = open_vectors(directory, manifest)  # (N, D) memmap
    out = Path(out)
    with atomic_directory(out, overwrite=False) as tmp:
        cache = tmp / ".cache"
        dataset = Dataset.from_generator(_rows, gen_kwargs={"store": store, "vectors": vectors, "progress": progress},
                                         features=_FEATURES, cache_dir=str(cache))
        dataset.save_to_disk(str(tmp / KNOWLEDGE_DATASET))
        del dataset
        shutil.rmtree(cache, ignore_errors=True)
        faiss_file = directory / FAISS_NAME
        if faiss_file.is_file():
            shutil.copyfile(faiss_file, tmp / KNOWLEDGE_FAISS)
            if "IVF" in manifest.factory:
                print(f"note: the {manifest.factory} index keeps the nprobe it was built with (faiss' default 1); "
                      "transformers' RagRetriever searches it so, with a lower recall than index.nprobe gives here")
        else:  # an exact (torch) index has no faiss file: a flat inner-product one is exact too
            flat = faiss.IndexFlatIP(manifest.dim)
            for start in range(0, manifest.count, 65536):
                flat.add(np.ascontiguousarray(vectors[start:start + 65536], dtype=np.float32))
            faiss.write_index(flat, str(tmp / KNOWLEDGE_FAISS))
    print(f"rag-export-index: {manifest.count:,} passages (dim {manifest.dim}, {manifest.factory}) -> "
          f"{out / KNOWLEDGE_DATASET} + {out / KNOWLEDGE_FAISS}")
    return out


@command("rag-export-index")
def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``rag-export-index``; a bad input: one line on stderr, exit status 2."""
    parser = argparse.ArgumentParser(prog="rag-export-index", description="Write an index directory as a "
                                     "knowledge base transformers' RagRetriever(index_name='custom') loads.")
    parser.add_argument("index", help="a rag-build-index output directory (or its index/ subdirectory)")
    parser.add_argument("--out", required=True, help="the directory to write (dataset/ + index.faiss)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    export_knowledge_dataset(args.index, args.out, progress=not args.no_progress)


if __name__ == "__main__":
    main()
