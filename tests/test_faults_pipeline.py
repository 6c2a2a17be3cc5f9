"""Faults a demanding user hit in the pipeline and its inputs, each reproduced and its fixed behaviour asserted:
a stale evaluation after stages moved, --set values parsed unlike --config., a missing config file, a Fashion-
MNIST cache that ignored its idx_dir, a truncated IDX file and garbage Inception weights."""

import json
import os
import shutil

import numpy as np
import pytest

from hd import ablation, pipeline
from hd.checkpoint import latest_step
from hd.data import fashion_mnist, load_source, prepare_fashion_mnist

from conftest import run_main, tree_snapshot
from test_data import FAKE_SIZES, _data_cfg, _fake_images, _write_idx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "toy2d.py")
# Three evaluation rows instead of seven: the same code paths at less than half the evaluation time.
SMALL_EVAL = ("eval.teacher_euler_steps=(1,)", "eval.teacher_heun_steps=()", "eval.student_steps=(1,)")


# --- stale evaluation and stages built from an older teacher or sketch ----------------------------------


@pytest.fixture(scope="module")
def finished_pipeline(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pipeline") / "work")
    entries = pipeline.run_pipeline(CONFIG, workdir, "tiny", SMALL_EVAL)
    return workdir, entries


class _Evaluated(Exception):
    pass


def test_results_record_the_checkpoint_step_of_every_row(finished_pipeline):
    workdir, entries = finished_pipeline
    assert [(e["model"], e["stage"], e["checkpoint_step"]) for e in entries] == [
        ("teacher", "teacher", 20), ("sketch", "sketch", 20), ("refine", "refine", 20)]
    with open(os.path.join(workdir, "eval", "results.json")) as f:
        assert json.load(f) == entries
    with open(os.path.join(workdir, "eval", pipeline.SOURCES_FILE)) as f:
        sources = json.load(f)
    assert {s: v["step"] for s, v in sources["stages"].items()} == {"teacher": 20, "sketch": 20, "refine": 20}
    assert sources["stages"]["refine"]["built_from"] == {"teacher": 20, "sketch": 20}
    with open(os.path.join(workdir, pipeline.PLAN_FILE)) as f:
        plan = json.load(f)
    assert plan == {"teacher": {"built_from": {}}, "sketch": {"built_from": {"teacher": 20}},
                    "refine": {"built_from": {"teacher": 20, "sketch": 20}}}


def test_more_steps_refuse_to_extend_stages_built_from_the_old_teacher(finished_pipeline):
    # The fault: `--set num_steps=300` trained every stage further (the sketch's later steps distilled from
    # another teacher than its first ones), skipped the evaluation and printed the old table as current.
    workdir, _ = finished_pipeline
    before = tree_snapshot(workdir)
    with pytest.raises(pipeline.StaleStageError) as error:
        pipeline.run_pipeline(CONFIG, workdir, "tiny", SMALL_EVAL + ("num_steps=30",))
    message = str(error.value)
    assert "sketch (" in message and "built from teacher step 20, but teacher will be at step 30" in message
    assert "refine (" in message and "sketch step 20, but sketch is trained again" in message
    assert "--rebuild_stale" in message and "Nothing was trained or written" in message
    assert tree_snapshot(workdir) == before


def test_results_without_a_record_of_their_checkpoints_are_evaluated_again(finished_pipeline, monkeypatch):
    # Work directories from before this record: the old results are kept aside and the evaluation reruns.
    import hd.eval.evaluator

    workdir, entries = finished_pipeline
    eval_dir = os.path.join(workdir, "eval")
    os.rename(os.path.join(eval_dir, pipeline.SOURCES_FILE), os.path.join(workdir, "sources.json.saved"))
    os.rename(os.path.join(workdir, pipeline.PLAN_FILE), os.path.join(workdir, "pipeline.json.saved"))
    try:
        def evaluated(*args, **kwargs):
            raise _Evaluated

        monkeypatch.setattr(hd.eval.evaluator, "evaluate", evaluated)
        with pytest.raises(_Evaluated):
            pipeline.run_pipeline(CONFIG, workdir, "tiny", SMALL_EVAL)
        (kept,) = os.listdir(os.path.join(eval_dir, pipeline.SUPERSEDED))
        with open(os.path.join(eval_dir, pipeline.SUPERSEDED, kept, "results.json")) as f:
            assert json.load(f) == entries
        with open(os.path.join(workdir, pipeline.PLAN_FILE)) as f:  # rebuilt from the stages' newest steps
            assert json.load(f)["refine"] == {"built_from": {"teacher": 20, "sketch": 20}}
    finally:
        shutil.rmtree(os.path.join(eval_dir, pipeline.SUPERSEDED), ignore_errors=True)
        os.replace(os.path.join(workdir, "sources.json.saved"), os.path.join(eval_dir, pipeline.SOURCES_FILE))
        os.replace(os.path.join(workdir, "pipeline.json.saved"), os.path.join(workdir, pipeline.PLAN_FILE))


def test_rebuild_stale_moves_stale_stages_aside_and_evaluates_the_new_checkpoints(finished_pipeline, monkeypatch):
    workdir, old_entries = finished_pipeline
    entries = pipeline.run_pipeline(CONFIG, workdir, "tiny", SMALL_EVAL + ("num_steps=30",), rebuild_stale=True)
    for stage in ("teacher", "sketch", "refine"):
        assert latest_step(os.path.join(workdir, stage)) == 30
    # The superseded sketch and refine stages are kept whole, at the step they had.
    superseded = sorted(os.listdir(os.path.join(workdir, pipeline.SUPERSEDED)))
    assert [name.split("-")[0] for name in superseded] == ["refine", "sketch"]
    for name in superseded:
        assert latest_step(os.path.join(workdir, pipeline.SUPERSEDED, name)) == 20
    with open(os.path.join(workdir, pipeline.PLAN_FILE)) as f:
        assert json.load(f)["refine"] == {"built_from": {"teacher": 30, "sketch": 30}}
    # The evaluation ran again on the new checkpoints; the old table is kept beside it.
    assert [(e["stage"], e["checkpoint_step"]) for e in entries] == [("teacher", 30), ("sketch", 30), ("refine", 30)]
    assert [e["fd"] for e in entries] != [e["fd"] for e in old_entries]
    (kept,) = os.listdir(os.path.join(workdir, "eval", pipeline.SUPERSEDED))
    with open(os.path.join(workdir, "eval", pipeline.SUPERSEDED, kept, "results.json")) as f:
        assert [e["checkpoint_step"] for e in json.load(f)] == [20, 20, 20]

    # Now current: the same command trains and evaluates nothing.
    import hd.eval.evaluator
    import hd.train.loop

    def fail(*args, **kwargs):
        raise AssertionError("nothing moved: nothing may be trained or evaluated")

    monkeypatch.setattr(hd.train.loop, "train", fail)
    monkeypatch.setattr(hd.eval.evaluator, "evaluate", fail)
    assert pipeline.run_pipeline(CONFIG, workdir, "tiny", SMALL_EVAL + ("num_steps=30",)) == entries


# --- --set parsed like --config. ------------------------------------------------------------------------


def _teacher_config():
    return pipeline.load_config_file(CONFIG).get_config("tiny")


@pytest.mark.parametrize("item, words", [
    ("batch_size=abc", ("batch_size", "'abc'", "an integer")),
    ("num_steps=1.5", ("num_steps", "'1.5'", "an integer")),
    ("model.remat=ture", ("model.remat", "'ture'", "true or false")),
    ("optimizer.lr=fast", ("optimizer.lr", "'fast'", "a number")),
    ("batch_sise=64", ("no key 'batch_sise'", "did you mean batch_size")),
    ("model=mlp", ("'model' is a group of keys", "model.width")),
    ("num_steps", ("is not KEY=VALUE",)),
])
def test_set_rejects_a_bad_value_naming_key_value_and_type(item, words):
    with pytest.raises(ValueError) as error:
        pipeline.apply_overrides(_teacher_config(), [item])
    for word in words:
        assert word in str(error.value)


def test_set_parses_values_as_config_flags_do():
    config = pipeline.apply_overrides(_teacher_config(), [
        "model.remat=true", "model.scan_blocks=False", "batch_size=32", "optimizer.lr=3e-4",
        "eval.student_steps=(1, 4)", "eval.teacher_heun_steps=()", "data.toy=moons"])
    assert config.model.remat is True and config.model.scan_blocks is False
    assert config.batch_size == 32 and config.optimizer.lr == 3e-4
    assert config.eval.student_steps == (1, 4) and config.eval.teacher_heun_steps == ()
    assert config.data.toy == "moons"


def test_pipeline_set_errors_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"--set model.remat=ture: 'ture' is not true or false"):
        pipeline.run_pipeline(CONFIG, str(tmp_path / "work"), "tiny", ("model.remat=ture",))
    assert not (tmp_path / "work").exists()


# --- a missing config file -------------------------------------------------------------------------------


@pytest.mark.parametrize("run", [pipeline.run_pipeline, ablation.run_ablation])
def test_missing_config_file_is_named(run, tmp_path):
    missing = os.path.join(REPO, "configs", "no_such_config.py")
    with pytest.raises(FileNotFoundError, match=f"config file {missing} does not exist") as error:
        run(missing, str(tmp_path / "work"), "tiny")
    assert "toy2d.py" in str(error.value)  # the configs that do exist
    assert not (tmp_path / "work").exists()
    with pytest.raises(FileNotFoundError, match="take the file alone"):  # hd.main's FILE:VARIANT habit
        run(CONFIG + ":tiny", str(tmp_path / "work"), "tiny")


def test_hd_main_names_a_missing_config_file(tmp_path):
    result = run_main("no_such_config.py:tiny", tmp_path / "work")
    assert result.returncode != 0
    missing = os.path.join(REPO, "configs", "no_such_config.py")
    assert f"config file {missing} does not exist" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "work").exists()


# --- the Fashion-MNIST cache and its IDX files -----------------------------------------------------------


def _idx_dir(path, seed_shift: int = 0) -> str:
    os.makedirs(path)
    for prefix in FAKE_SIZES:
        images, labels = _fake_images(prefix)
        _write_idx(os.path.join(path, f"{prefix}-images-idx3-ubyte.gz"), (images + seed_shift).astype(np.uint8))
        _write_idx(os.path.join(path, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return str(path)


def test_fashion_mnist_cache_is_checked_against_its_idx_dir(tmp_path):
    idx_dir, data_dir = _idx_dir(tmp_path / "idx"), str(tmp_path / "tfds")
    prepare_fashion_mnist(data_dir, idx_dir)
    version_dir = os.path.join(data_dir, fashion_mnist.NAME, "1.0.0")
    record = os.path.join(version_dir, fashion_mnist.SOURCE_RECORD)
    assert os.path.exists(record)
    cached = load_source(_data_cfg(data_dir=data_dir, idx_dir=idx_dir)).get(np.arange(3))["x"]

    # The fault: a nonexistent idx_dir was ignored once the cache existed.
    with pytest.raises(FileNotFoundError, match="idx_dir /nonexistent .*does not exist.*idx_dir=''"):
        load_source(_data_cfg(data_dir=data_dir, idx_dir="/nonexistent"))
    # Other files (here: other pixels) under the same cache are an error naming the files that differ.
    other = _idx_dir(tmp_path / "other", seed_shift=1)
    with pytest.raises(ValueError, match=r"holds different \['t10k-images-idx3-ubyte.gz', "
                                         r"'train-images-idx3-ubyte.gz'\]"):
        prepare_fashion_mnist(data_dir, other)
    # A copy of the same files elsewhere is the same source; '' takes the cache as it is.
    copy = shutil.copytree(idx_dir, tmp_path / "copy")
    prepare_fashion_mnist(data_dir, str(copy))
    np.testing.assert_array_equal(load_source(_data_cfg(data_dir=data_dir, idx_dir="")).get(np.arange(3))["x"],
                                  cached)
    with pytest.raises(FileNotFoundError, match="holds none"):
        prepare_fashion_mnist(str(tmp_path / "empty"), "")

    # A cache prepared before caches recorded their source: accepted (and recorded) when the split sizes match.
    os.remove(record)
    prepare_fashion_mnist(data_dir, idx_dir)
    with open(record) as f:
        assert json.load(f)["idx_dir"] == os.path.realpath(idx_dir)
    os.remove(record)
    smaller = tmp_path / "smaller"
    os.makedirs(smaller)
    for prefix in FAKE_SIZES:
        images, labels = _fake_images(prefix)
        _write_idx(smaller / f"{prefix}-images-idx3-ubyte.gz", images[:10])
        _write_idx(smaller / f"{prefix}-labels-idx1-ubyte.gz", labels[:10])
    with pytest.raises(ValueError, match="has 120 train examples but .*train-images-idx3-ubyte.gz has 10"):
        prepare_fashion_mnist(data_dir, str(smaller))


def test_truncated_idx_file_is_named_with_the_fix(tmp_path):
    idx_dir = _idx_dir(tmp_path / "idx")
    path = os.path.join(idx_dir, "train-images-idx3-ubyte.gz")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError) as error:
        prepare_fashion_mnist(str(tmp_path / "tfds"), idx_dir)
    message = str(error.value)
    assert path in message and "truncated or corrupt" in message and "dataset-fashion-mnist" in message
    assert not os.path.exists(os.path.join(tmp_path, "tfds", fashion_mnist.NAME, "1.0.0", "dataset_info.json"))


# --- Inception weights that are not a converted weights file -----------------------------------------------


def test_garbage_inception_weights_name_the_file_and_how_it_is_made(tmp_path):
    from hd.eval.inception import load_inception_params

    path = tmp_path / "inception.pkl"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.warns(UserWarning, match="not verified"), pytest.raises(ValueError) as error:
        load_inception_params(path, None)
    message = str(error.value)
    assert str(path) in message and "is not a pickle of InceptionV3 weights" in message
    assert "python -m hd.eval.convert_inception" in message and "inception_sha256" in message
    with pytest.raises(FileNotFoundError, match="inception_missing.pkl .*does not exist.*convert_inception"):
        load_inception_params(tmp_path / "inception_missing.pkl", None)
