"""rag-import / rag-export: transformers RAG checkpoints in and out, every output-changing setting mapped or refused.

The end-to-end parity of an imported model with transformers' own pipeline is in
tests/test_transformers_pipeline.py; here: the mapping, the round trip, the refusals, the CLIs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from datasets import load_from_disk
from transformers import RagSequenceForGeneration, RagTokenForGeneration, RagTokenizer

from index.build_cli import build_index
from index.dataset_export import main as export_index_main
from index.passages import PassageStore
from rag_models import file_manifest
from rag_models.checkpoint import build_rag_model, load_rag_model, save_rag_model
from rag_models.convert_cli import export_main, import_main
from rag_models.errors import InputError
from rag_models.transformers_rag import PROVENANCE_NAME, export_transformers_rag, import_transformers_rag
from tiny_setup import TinySetup, tiny_overrides
from training.config import compose, instantiate
from training.demo.transformers_example import save_transformers_rag
from training.lit.train_cli import train

HF_CLASSES = {"sequence": RagSequenceForGeneration, "token": RagTokenForGeneration}


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _assert_same_weights(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.fixture(params=["sequence", "token"])
def hf_dir(request, tiny_setup: TinySetup, tmp_path: Path) -> Path:
    """A transformers RAG directory with non-default settings that change outputs."""
    return save_transformers_rag(tiny_setup.models, request.param, tmp_path / f"hf_{request.param}", n_docs=4,
                                 title_sep=" | ", doc_sep=" :: ", max_combined_length=120, label_smoothing=0.1,
                                 exclude_bos_score=True, reduce_loss=True)


def test_import_maps_every_setting_and_keeps_the_weights(hf_dir: Path, tmp_path: Path):
    marginalization = "sequence" if "sequence" in hf_dir.name else "token"
    out = import_transformers_rag(hf_dir, tmp_path / "ours")
    settings = json.loads((out / "rag_config.json").read_text())
    assert settings["marginalization"] == marginalization
    assert settings["n_docs"] == 4 and settings["max_source_length"] == 120
    assert settings["title_sep"] == " | " and settings["doc_sep"] == " :: "
    assert settings["input_format"] == "transformers" and settings["label_smoothing"] == 0.1
    assert settings["loss_reduction"] == "sum"
    # transformers' RagTokenForGeneration ignores exclude_bos_score: the import computes what it computes.
    assert settings["exclude_bos_score"] is (marginalization == "sequence")
    provenance = json.loads((out / PROVENANCE_NAME).read_text())
    assert provenance["architecture"] == HF_CLASSES[marginalization].__name__
    assert provenance["index"]["dataset"] == "wiki_dpr"

    theirs = HF_CLASSES[marginalization].from_pretrained(hf_dir)
    ours = load_rag_model(out)
    _assert_same_weights(_state(ours.question_encoder.model), _state(theirs.question_encoder))
    _assert_same_weights(_state(ours.generator.model), _state(theirs.generator))
    tokenizer = RagTokenizer.from_pretrained(hf_dir)
    text = "who founded Marrowick in 1742?"
    assert ours.question_tokenizer(text)["input_ids"] == tokenizer.question_encoder(text)["input_ids"]
    assert ours.generator.tokenizer(text)["input_ids"] == tokenizer.generator(text)["input_ids"]


def test_import_export_import_is_the_identity(hf_dir: Path, tmp_path: Path):
    first = import_transformers_rag(hf_dir, tmp_path / "first")
    exported = export_transformers_rag(first, tmp_path / "exported")
    marginalization = json.loads((first / "rag_config.json").read_text())["marginalization"]
    # transformers loads the export with its own classes
    theirs = HF_CLASSES[marginalization].from_pretrained(exported)
    RagTokenizer.from_pretrained(exported)
    assert theirs.config.n_docs == 4 and theirs.config.title_sep == " | " and theirs.config.max_combined_length == 120
    second = import_transformers_rag(exported, tmp_path / "second")
    for name in ("rag_config.json", "generator/generation_config.json"):
        assert json.loads((first / name).read_text()) == json.loads((second / name).read_text()), name
    a, b = load_rag_model(first), load_rag_model(second)
    _assert_same_weights(_state(a), _state(b))


def _edit_config(hf_dir: Path, name: str = "config.json", **changes: object) -> None:
    path = hf_dir / name
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes,named", [
    ({"do_deduplication": False}, "do_deduplication"),
    ({"some_new_setting": 3}, "some_new_setting"),
    ({"bos_token_id": 7}, "bos_token_id"),
    ({"prefix": "answer: "}, "prefix"),
    ({"max_combined_length": 300}, "max_combined_length"),
])
def test_settings_without_an_equivalent_are_refused_by_name(tiny_setup: TinySetup, tmp_path: Path, changes, named):
    hf_dir = save_transformers_rag(tiny_setup.models, "sequence", tmp_path / "hf")
    _edit_config(hf_dir, **changes)
    with pytest.raises(InputError, match=named):
        import_transformers_rag(hf_dir, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()  # nothing half-written


def test_unsupported_generation_settings_are_refused_by_name(tiny_setup: TinySetup, tmp_path: Path):
    hf_dir = save_transformers_rag(tiny_setup.models, "token", tmp_path / "hf")
    # RagTokenForGeneration decodes with its generation_config.json (config.json's copies are ignored then)
    _edit_config(hf_dir, "generation_config.json", repetition_penalty=1.3, num_beams=3, no_repeat_ngram_size=2)
    with pytest.raises(InputError, match="repetition_penalty=1.3"):
        import_transformers_rag(hf_dir, tmp_path / "ours")
    _edit_config(hf_dir, "generation_config.json", repetition_penalty=1.0)  # supported ones are kept
    out = import_transformers_rag(hf_dir, tmp_path / "ours")
    generation = json.loads((out / "generator" / "generation_config.json").read_text())
    assert generation["num_beams"] == 3 and generation["no_repeat_ngram_size"] == 2


def test_a_bare_rag_model_needs_its_marginalization(tiny_setup: TinySetup, tmp_path: Path):
    hf_dir = save_transformers_rag(tiny_setup.models, "token", tmp_path / "hf")
    _edit_config(hf_dir, architectures=["RagModel"])
    with pytest.raises(InputError, match="--marginalization"):
        import_transformers_rag(hf_dir, tmp_path / "ours")
    out = import_transformers_rag(hf_dir, tmp_path / "ours", marginalization="token")
    assert json.loads((out / "rag_config.json").read_text())["marginalization"] == "token"
    with pytest.raises(InputError, match="marginalizes per token"):
        import_transformers_rag(save_transformers_rag(tiny_setup.models, "token", tmp_path / "hf2"),
                                tmp_path / "x", marginalization="sequence")


def test_a_non_rag_checkpoint_is_refused(tiny_setup: TinySetup, tmp_path: Path):
    with pytest.raises(InputError, match="not a transformers RAG"):
        import_transformers_rag(tiny_setup.models.generator, tmp_path / "ours")


def test_export_refuses_a_model_trained_on_another_input_format(tiny_setup: TinySetup, tmp_path: Path):
    model = build_rag_model(question_encoder=str(tiny_setup.models.question_encoder),
                            generator=str(tiny_setup.models.generator), max_source_length=128,
                            max_question_length=32)
    saved = save_rag_model(model, tmp_path / "ours")
    with pytest.raises(InputError, match="question_first"):
        export_transformers_rag(saved, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    exported = export_transformers_rag(saved, tmp_path / "hf", allow_input_format_change=True)
    assert RagSequenceForGeneration.from_pretrained(exported).config.max_combined_length == 128


def test_cli_round_trip_and_errors(tiny_setup: TinySetup, tmp_path: Path, capsys):
    hf_dir = save_transformers_rag(tiny_setup.models, "sequence", tmp_path / "hf", n_docs=2)
    import_main([str(hf_dir), "--out", str(tmp_path / "ours")])
    assert "RAG-Sequence, n_docs 2" in capsys.readouterr().out
    export_main([str(tmp_path / "ours"), "--out", str(tmp_path / "back")])
    assert (tmp_path / "back" / "question_encoder_tokenizer").is_dir()
    with pytest.raises(SystemExit) as exit_info:
        import_main([str(tiny_setup.models.generator), "--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2
    assert "rag-import: error:" in capsys.readouterr().err


def test_fine_tune_from_an_imported_checkpoint(tiny_setup: TinySetup, tmp_path: Path):
    """rag-train init_from=DIR starts from the imported weights and reading settings, and trains them."""
    hf_dir = save_transformers_rag(tiny_setup.models, "sequence", tmp_path / "hf", max_combined_length=100,
                                   title_sep=" | ")
    imported = import_transformers_rag(hf_dir, tmp_path / "imported")
    cfg = compose(["experiment=nq_rag_sequence", *tiny_overrides(tiny_setup, tmp_path / "run"),
                   f"init_from={imported}", "trainer.max_steps=3", "trainer.limit_val_batches=0", "test=false",
                   "module.warmup_steps=0"])
    start = instantiate(cfg.model)
    assert start.generator.input_format == "transformers" and start.generator.max_source_length == 100
    assert start.generator.title_sep == " | " and start.n_docs == cfg.model.n_docs  # training settings: the config's
    _assert_same_weights(_state(start), _state(load_rag_model(imported)))
    result = train(cfg)
    trained = load_rag_model(result.export_dir)
    assert trained.generator.input_format == "transformers"
    before, after = _state(start.generator.model), _state(trained.generator.model)
    assert any(not torch.equal(before[name], after[name]) for name in before)  # it trained
    with pytest.raises(InputError, match="not a saved RagModel"):
        instantiate(compose([*tiny_overrides(tiny_setup, tmp_path / "bad"), f"init_from={hf_dir}"]).model)


@pytest.mark.parametrize("factory", ["Flat", "exact"])
def test_rag_export_index_writes_a_custom_knowledge_base(tiny_setup: TinySetup, tmp_path: Path, factory: str, capsys):
    index_dir = tiny_setup.index_dir
    if factory == "exact":  # no faiss file: the export builds an exact inner-product one
        index_dir = build_index(tiny_setup.world.v1_passages, tiny_setup.models.context_encoder, tmp_path / "exact",
                                factory="exact", max_length=128, progress=False).parent
    export_index_main([str(index_dir), "--out", str(tmp_path / "kb"), "--no-progress"])
    dataset = load_from_disk(str(tmp_path / "kb" / "dataset"))
    store = PassageStore.open(tiny_setup.index_dir / "passages")
    assert dataset.column_names == ["id", "title", "text", "embeddings"] and len(dataset) == len(store)
    assert dataset[3]["title"] == store.titles([3])[0] and dataset[3]["id"] == store.ids([3])[0]
    index = faiss.read_index(str(tmp_path / "kb" / "index.faiss"))
    assert index.ntotal == len(store) and index.metric_type == faiss.METRIC_INNER_PRODUCT
    query = np.asarray(dataset[5]["embeddings"], dtype=np.float32)[None]
    vectors = np.load(tiny_setup.index_dir / "index" / "vectors.npy")
    assert index.search(query, 1)[1][0, 0] == int(np.argmax(vectors @ query[0]))
    with pytest.raises(SystemExit) as exit_info:
        export_index_main([str(tmp_path / "kb"), "--out", str(tmp_path / "kb2")])
    assert exit_info.value.code == 2 and "no manifest.json" in capsys.readouterr().err


def test_generic_keys_of_older_configs_are_accepted(tiny_setup: TinySetup, tmp_path: Path):
    """The released checkpoints were saved by transformers 3/4, whose config.json lists generic bookkeeping keys."""
    hf_dir = save_transformers_rag(tiny_setup.models, "sequence", tmp_path / "hf")
    _edit_config(hf_dir, use_bfloat16=False, torchscript=False, pruned_heads={}, is_decoder=False,
                 task_specific_params=None, tokenizer_class=None, num_beams=4, max_length=20)
    assert json.loads((import_transformers_rag(hf_dir, tmp_path / "ours") / "rag_config.json").read_text())


def test_a_checkpoint_without_its_tokenizer_files_is_refused(tiny_setup: TinySetup, tmp_path: Path):
    """transformers builds an empty tokenizer from a directory without vocabulary files: answers would be wrong."""
    hf_dir = save_transformers_rag(tiny_setup.models, "sequence", tmp_path / "hf")
    shutil.rmtree(hf_dir / "generator_tokenizer")
    with pytest.raises(InputError, match="generator_tokenizer.*no vocabulary"):
        import_transformers_rag(hf_dir, tmp_path / "ours")
    ours = save_rag_model(build_rag_model(question_encoder=str(tiny_setup.models.question_encoder),
                                          generator=str(tiny_setup.models.generator), max_source_length=128,
                                          max_question_length=32), tmp_path / "model")
    for name in (ours / "question_encoder").glob("*"):
        if "vocab" in name.name or "tokenizer" in name.name:
            name.unlink()
    with pytest.raises(InputError, match=r"question_encoder/tokenizer.*: file missing: the checkpoint is damaged"):
        load_rag_model(ours)  # its checksums.json lists the files
    (ours / "checksums.json").unlink()  # as written before file manifests: transformers' empty tokenizer is caught
    with pytest.warns(UserWarning, match="no checksums.json"), pytest.raises(InputError, match="no vocabulary"):
        load_rag_model(ours)


def test_an_existing_out_directory_is_never_replaced(tiny_setup: TinySetup, tmp_path: Path):
    hf_dir = save_transformers_rag(tiny_setup.models, "token", tmp_path / "hf")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "keep.txt").write_text("mine")
    for out in (tmp_path / "precious", hf_dir):
        with pytest.raises(InputError, match="already exists"):
            import_transformers_rag(hf_dir, out)
    assert (tmp_path / "precious" / "keep.txt").read_text() == "mine" and (hf_dir / "config.json").is_file()
    imported = import_transformers_rag(hf_dir, tmp_path / "ours")
    with pytest.raises(InputError, match="already exists"):
        export_transformers_rag(imported, tmp_path / "precious")
    with pytest.raises(SystemExit):  # rag-export-index: "already exists", exit 2
        export_index_main([str(tiny_setup.index_dir), "--out", str(tmp_path / "precious")])
    assert (tmp_path / "precious" / "keep.txt").read_text() == "mine"


def test_rag_sequence_export_keeps_the_generators_generation_settings(tiny_setup: TinySetup, tmp_path: Path):
    """transformers' RagSequenceForGeneration loses them in a save / load; our export keeps them beside it."""
    imported = import_transformers_rag(save_transformers_rag(tiny_setup.models, "sequence", tmp_path / "hf"),
                                       tmp_path / "first")
    path = imported / "generator" / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_beams": 4, "no_repeat_ngram_size": 3,
                                "max_length": 20}))
    assert file_manifest.main([str(imported)]) == 0  # edited on purpose: list the files again (else refused)
    exported = export_transformers_rag(imported, tmp_path / "exported")
    again = import_transformers_rag(exported, tmp_path / "again")
    assert json.loads((again / "generator" / "generation_config.json").read_text()) == json.loads(path.read_text())
    assert json.loads((exported / "config.json").read_text())["retrieval_vector_size"] == 32  # the model's D


def test_knowledge_of_another_dimension_is_refused(tiny_setup: TinySetup, tmp_path: Path):
    imported = import_transformers_rag(save_transformers_rag(tiny_setup.models, "token", tmp_path / "hf"),
                                       tmp_path / "ours")
    (tmp_path / "kb" / "dataset").mkdir(parents=True)
    faiss.write_index(faiss.IndexFlatIP(8), str(tmp_path / "kb" / "index.faiss"))
    with pytest.raises(InputError, match="dimension 8, the model's question vectors 32"):
        export_transformers_rag(imported, tmp_path / "hf_out", knowledge=tmp_path / "kb")


def test_init_from_a_transformers_directory_says_to_import_it_first(tiny_setup: TinySetup, tmp_path: Path):
    hf_dir = save_transformers_rag(tiny_setup.models, "token", tmp_path / "hf")
    with pytest.raises(InputError, match="rag-import"):
        load_rag_model(hf_dir)
