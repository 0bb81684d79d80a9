"""gpuad.kernels.tuning: registration, per-GPU tables, validation, overrides and the fallback."""
import json

import pytest

from gpuad.kernels import tuning

OP = "test.op"


@pytest.fixture
def op():
    tuning.register(OP, {"block": (64, 128, 256), "stages": (2, 3)}, {"block": 128, "stages": 2})
    yield OP
    tuning._SPACES.pop(OP, None)
    tuning._DEFAULTS.pop(OP, None)
    tuning.reload()


def test_fallback_for_unknown_and_missing_gpu(op):
    assert tuning.value(op, "block", None) == 128
    assert tuning.value(op, "block", "Some GPU nobody tuned") == 128


def test_table_is_read_and_validated(op, tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "TUNED_DIR", str(tmp_path))
    name = "NVIDIA H100 80GB HBM3"
    assert tuning.file_name(name) == "NVIDIA_H100_80GB_HBM3.json"
    (tmp_path / tuning.file_name(name)).write_text(json.dumps({"gpu": name, "ops": {op: {"block": 256}}}))
    tuning.reload()
    assert tuning.values(op, name) == {"block": 256, "stages": 2}
    for bad, match in [({op: {"block": 100}}, "block = 100 is not among"), ({op: {"warps": 4}}, "unknown parameter"),
                       ({"nope": {}}, "unknown op")]:
        (tmp_path / tuning.file_name(name)).write_text(json.dumps({"ops": bad}))
        tuning.reload()
        with pytest.raises(ValueError, match=match):
            tuning.value(op, "block", name)


def test_the_tables_folder_comes_from_the_environment(tmp_path):
    import os
    import subprocess
    import sys
    code = "from gpuad.kernels import tuning; print(tuning.TUNED_DIR)"
    got = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, GPUAD_TUNED_DIR=str(tmp_path)),
                         capture_output=True, text=True, check=True).stdout.strip()
    assert got == str(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "GPUAD_TUNED_DIR"}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True).stdout.strip()
    assert default == os.path.join(os.path.dirname(tuning.__file__), "tuned")


def test_override_wins_and_is_restored(op):
    with tuning.override(op, block=64):
        assert tuning.value(op, "block") == 64
        with tuning.override(op, stages=3):
            assert tuning.values(op) == {"block": 64, "stages": 3}
    assert tuning.values(op) == {"block": 128, "stages": 2}
    with pytest.raises(ValueError, match="not among"):
        with tuning.override(op, block=7):
            pass


def test_register_refuses_a_default_outside_its_space():
    with pytest.raises(ValueError, match="not among"):
        tuning.register("test.bad", {"block": (1, 2)}, {"block": 3})


def test_tuple_values_round_trip_through_json(tmp_path, monkeypatch):
    """A tile config declared as a tuple is written by the sweep as a JSON list and read back as
    the tuple; a list that is not among the declared tuples is still refused."""
    tuning.register("test.tiles", {"tile": ((64, 64, 32), (128, 64, 32))}, {"tile": (64, 64, 32)})
    try:
        monkeypatch.setattr(tuning, "TUNED_DIR", str(tmp_path))
        path = tmp_path / tuning.file_name("Some GPU")
        path.write_text(json.dumps({"ops": {"test.tiles": {"tile": (128, 64, 32)}}}))
        tuning.reload()
        assert tuning.value("test.tiles", "tile", "Some GPU") == (128, 64, 32)
        path.write_text(json.dumps({"ops": {"test.tiles": {"tile": [128, 128, 32]}}}))
        tuning.reload()
        with pytest.raises(ValueError, match=r"tile = \(128, 128, 32\) is not among"):
            tuning.value("test.tiles", "tile", "Some GPU")
    finally:
        tuning._SPACES.pop("test.tiles", None)
        tuning._DEFAULTS.pop("test.tiles", None)
        tuning.reload()


def test_active_overrides_are_this_threads_values_of_one_op(op):
    """What a launcher's plan key reads: sorted (param, value) pairs inside an override of the op,
    None outside it and for other ops."""
    assert tuning.active_overrides(op) is None
    with tuning.override(op, stages=3, block=64):
        assert tuning.active_overrides(op) == (("block", 64), ("stages", 3))
        assert tuning.active_overrides("triton.linear_backward") is None
        hash(tuning.active_overrides(op))
    assert tuning.active_overrides(op) is None


def test_an_override_in_another_thread_is_not_this_threads(op):
    """The skip of the thread-local lookup when no override is open anywhere keeps the values
    per thread: another thread's open override is not this thread's; closed, nothing is open."""
    import threading

    opened, release = threading.Event(), threading.Event()

    def other():
        with tuning.override(op, stages=3):
            opened.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert opened.wait(10)
        assert tuning._open_overrides[0] == 1 and tuning.active_overrides(op) is None
        with tuning.override(op, block=64):
            assert tuning.active_overrides(op) == (("block", 64),)
    finally:
        release.set()
        thread.join()
    assert tuning._open_overrides[0] == 0 and tuning.active_overrides(op) is None
