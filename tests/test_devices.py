"""Device selection and worker slots (hposvc.devices), tested without a GPU.

GPU machines are described by passing ``cuda_count`` explicitly and setting
``CUDA_VISIBLE_DEVICES``; the worker environment is checked in a real subprocess.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch

from hposvc.devices import (
    Slot,
    apply_slot_threads,
    free_device_memory,
    is_out_of_memory,
    parse_devices,
    plan_slots,
    resolve_device,
    slot_env,
    usable_cpu_count,
    visible_gpu_ids,
)
from hposvc.errors import InvalidInputError, TrainingError


@pytest.fixture(autouse=True)
def _no_visible_devices_env(monkeypatch):
    # Each test states the CUDA_VISIBLE_DEVICES it means; the caller's must not leak in.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


# --- parse_devices: the documented order -------------------------------------------------


def test_auto_prefers_every_visible_gpu_then_cpu():
    assert parse_devices("auto", cuda_count=3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert parse_devices(None, cuda_count=2) == ["cuda:0", "cuda:1"]
    assert parse_devices("auto", cuda_count=0) == ["cpu"]


def test_explicit_lists_win_over_auto():
    assert parse_devices("cuda:2,cuda:0", cuda_count=3) == ["cuda:2", "cuda:0"]
    assert parse_devices(" CUDA:1 , cuda:0 ", cuda_count=2) == ["cuda:1", "cuda:0"]
    assert parse_devices(["cuda:1"], cuda_count=2) == ["cuda:1"]
    assert parse_devices("cuda", cuda_count=2) == ["cuda:0", "cuda:1"]
    assert parse_devices("cpu", cuda_count=4) == ["cpu"]


def test_missing_gpu_names_what_exists():
    with pytest.raises(InvalidInputError) as info:
        parse_devices("cuda:0,cuda:7", cuda_count=2)
    message = str(info.value)
    assert "the 'devices' parameter must be" in message
    assert "Got 'cuda:7' instead." in message
    assert "'cuda:0', 'cuda:1'" in message
    assert "torch sees 2 CUDA GPUs" in message


def test_cuda_without_gpus_says_so(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(InvalidInputError) as info:
        parse_devices("cuda", cuda_count=0)
    message = str(info.value)
    assert "'auto', 'cpu'" in message and "'cuda:0'" not in message
    assert "torch sees 0 CUDA GPUs with CUDA_VISIBLE_DEVICES=''" in message


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("tpu", "Got 'tpu' instead."),
        ("cuda:x", "Got 'cuda:x' instead."),
        ("", "Got '' instead."),
        ("cuda:0,cuda:0", "'cuda:0' is listed twice."),
        ("cpu,cuda:0", "'cpu' must be given alone"),
        ("auto,cuda:1", "'auto' must be given alone"),
    ],
)
def test_bad_device_specs_are_refused(spec, fragment):
    with pytest.raises(InvalidInputError, match="the 'devices' parameter must be") as info:
        parse_devices(spec, cuda_count=2)
    assert fragment in str(info.value)


# --- CUDA_VISIBLE_DEVICES mapping ----------------------------------------------------------


def test_visible_gpu_ids_follow_the_existing_mapping(monkeypatch):
    assert visible_gpu_ids(2) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert visible_gpu_ids(2) == ["3", "5"]
    # torch counts only the valid prefix; ids past it are not usable
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb,7")
    assert visible_gpu_ids(2) == ["GPU-aaaa", "GPU-bbbb"]


def test_slots_pin_the_physical_gpu_of_each_logical_one(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    slots = plan_slots("cuda:1", cuda_count=2, cpu_count=8)
    assert slots == [Slot(index=0, device="cuda:0", cuda_visible_devices="6", threads=8)]
    slots = plan_slots("auto", cuda_count=2, cpu_count=8)
    assert [s.cuda_visible_devices for s in slots] == ["4", "6"]
    assert {s.device for s in slots} == {"cuda:0"}


# --- plan_slots on GPUs ---------------------------------------------------------------------


def test_one_slot_per_gpu_by_default():
    slots = plan_slots(cuda_count=2, cpu_count=16)
    assert slots == [
        Slot(index=0, device="cuda:0", cuda_visible_devices="0", threads=8),
        Slot(index=1, device="cuda:0", cuda_visible_devices="1", threads=8),
    ]


def test_k_trials_per_gpu_interleave_over_the_gpus():
    slots = plan_slots("cuda:0,cuda:2", trials_per_device=3, cuda_count=4, cpu_count=12)
    assert [s.index for s in slots] == list(range(6))
    assert [s.cuda_visible_devices for s in slots] == ["0", "2", "0", "2", "0", "2"]
    assert {s.threads for s in slots} == {2}


def test_explicit_worker_count_round_robins_over_gpus():
    slots = plan_slots("auto", workers=3, cuda_count=2, cpu_count=2)
    assert [s.cuda_visible_devices for s in slots] == ["0", "1", "0"]
    assert {s.threads for s in slots} == {1}  # never below one thread


def test_workers_and_trials_per_device_conflict_on_gpus():
    with pytest.raises(InvalidInputError, match="not both"):
        plan_slots("auto", workers=4, trials_per_device=2, cuda_count=2)


# --- plan_slots on the CPU ------------------------------------------------------------------


def test_cpu_auto_is_one_slot_per_usable_core():
    slots = plan_slots("auto", cuda_count=0, cpu_count=4)
    assert [(s.index, s.device, s.cuda_visible_devices, s.threads) for s in slots] == [
        (i, "cpu", None, 1) for i in range(4)
    ]
    # without cpu_count it is this process's CPU affinity, not the machine's core count
    assert len(plan_slots("cpu", cuda_count=0)) == usable_cpu_count() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("workers", "cores", "expected_slots", "expected_threads"),
    [(1, 2, 1, 2), (2, 2, 2, 1), ("2", 8, 2, 4), (3, 8, 3, 2), (4, 2, 4, 1), ("auto", 6, 6, 1)],
)
def test_cpu_slots_split_cores_without_oversubscribing(workers, cores, expected_slots, expected_threads):
    slots = plan_slots("cpu", workers=workers, cpu_count=cores, cuda_count=2)
    assert len(slots) == expected_slots
    assert {s.threads for s in slots} == {expected_threads}
    assert {s.cuda_visible_devices for s in slots} == {None}
    # together they use the cores, unless there are more slots than cores
    assert sum(s.threads for s in slots) <= max(cores, expected_slots)


def test_trials_per_device_does_not_multiply_cpu_slots():
    assert len(plan_slots("cpu", trials_per_device=3, workers=2, cpu_count=4)) == 2


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"workers": 0}, "workers"),
        ({"workers": "many"}, "workers"),
        ({"workers": True}, "workers"),
        ({"workers": -2}, "workers"),
        ({"trials_per_device": 0}, "trials_per_device"),
        ({"trials_per_device": 1.5}, "trials_per_device"),
        ({"cpu_count": 0}, "cpu_count"),
    ],
)
def test_bad_counts_are_refused(kwargs, key):
    with pytest.raises(InvalidInputError, match=f"the '{key}' parameter must be"):
        plan_slots("cpu", cuda_count=0, **kwargs)


# --- the worker's environment ----------------------------------------------------------------


def test_slot_env_for_gpu_and_cpu_slots():
    gpu = slot_env(Slot(index=3, device="cuda:0", cuda_visible_devices="5", threads=2))
    assert gpu == {
        "CUDA_VISIBLE_DEVICES": "5",
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
        "HPOSVC_WORKER_THREADS": "2",
        "HPOSVC_WORKER_DEVICE": "cuda:0",
        "HPOSVC_WORKER_SLOT": "3",
    }
    cpu = slot_env(Slot(index=0, device="cpu", cuda_visible_devices=None, threads=1))
    assert cpu["CUDA_VISIBLE_DEVICES"] == ""  # a CPU slot must not pick up a GPU via "auto"
    assert cpu["HPOSVC_WORKER_THREADS"] == "1"


def test_a_worker_started_with_slot_env_runs_as_planned():
    # A real child process, as the local runner starts workers: env first, then torch.
    (slot,) = plan_slots("cpu", workers=1, cpu_count=2)
    code = (
        "import json, os, torch\n"
        "from hposvc.devices import apply_slot_threads, resolve_device\n"
        "applied = apply_slot_threads()\n"
        "print(json.dumps({'applied': applied, 'torch_threads': torch.get_num_threads(),"
        " 'device': str(resolve_device('auto')), 'cuda': torch.cuda.device_count(),"
        " 'cvd': os.environ['CUDA_VISIBLE_DEVICES']}))\n"
    )
    env = {**os.environ, **slot_env(slot)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"applied": 2, "torch_threads": 2, "device": "cpu", "cuda": 0, "cvd": ""}


def test_apply_slot_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("HPOSVC_WORKER_THREADS", raising=False)
        assert apply_slot_threads() is None
        assert torch.get_num_threads() == before
        monkeypatch.setenv("HPOSVC_WORKER_THREADS", "2")
        assert apply_slot_threads() == 2
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("HPOSVC_WORKER_THREADS", "two")
        with pytest.raises(InvalidInputError, match="environment: the 'HPOSVC_WORKER_THREADS' parameter"):
            apply_slot_threads()
    finally:
        torch.set_num_threads(before)


# --- resolve_device ---------------------------------------------------------------------------


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["tpu", "cuda:99", "gpu"])
def test_resolve_device_refuses_what_does_not_exist(spec):
    with pytest.raises(InvalidInputError) as info:
        resolve_device(spec)
    message = str(info.value)
    assert message.startswith("the 'device' parameter must be one of 'auto', 'cpu'")
    assert f"Got {spec!r} instead." in message
    assert f"torch sees {torch.cuda.device_count()} CUDA GPU" in message


# --- out of memory ------------------------------------------------------------------------------


def test_real_allocation_failure_is_out_of_memory():
    with pytest.raises(RuntimeError) as info:
        torch.empty(2**60, dtype=torch.uint8)  # an exabyte: the allocator refuses at once
    assert is_out_of_memory(info.value)


def test_out_of_memory_kinds_and_chains():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(MemoryError())
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except RuntimeError as e:
            raise TrainingError("trial 3 failed") from e
    except TrainingError as wrapped:
        assert is_out_of_memory(wrapped)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x2)"),
        ValueError("out of range"),
        TrainingError("diverged: loss is nan"),
        KeyboardInterrupt(),
    ],
)
def test_other_errors_are_not_out_of_memory(exc):
    assert not is_out_of_memory(exc)


def test_free_device_memory_collects_what_a_failed_trial_left():
    class Holder:
        pass

    holder = Holder()
    holder.tensor = torch.ones(1000)
    holder.self_ref = holder  # a cycle: only the garbage collector frees it
    alive = weakref.ref(holder)
    del holder
    gc.disable()  # so the collection is free_device_memory's, not an automatic one
    try:
        assert alive() is not None
        free_device_memory("cpu")
        assert alive() is None
    finally:
        gc.enable()
    free_device_memory(None)  # no device given: the default device, still no error
