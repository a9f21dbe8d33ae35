"""Where trials run: the one place that decides devices and worker slots.

Devices are chosen in this order; the first rule that applies wins:

1. An explicit ``--devices`` list: ``"cuda:0,cuda:2"`` (those GPUs), ``"cuda"`` (every
   visible GPU), ``"cpu"``, or ``"auto"`` (rules 2 and 3).
2. The GPUs that torch sees, i.e. the ones ``CUDA_VISIBLE_DEVICES`` leaves visible. Logical
   GPU ``i`` is the ``i``-th id listed in ``CUDA_VISIBLE_DEVICES`` (or physical GPU ``i``
   when it is unset), so pinning a worker keeps an existing mapping.
3. The CPU.

A *slot* is one worker process. On GPUs there are ``trials_per_device`` slots per GPU, each
pinned to its GPU with ``CUDA_VISIBLE_DEVICES`` (so inside the worker the device is always
``cuda:0``). On the CPU, ``workers`` slots share the cores, each with its own torch thread
count so that together they do not oversubscribe the machine.

>>> [s.device for s in plan_slots("cpu", workers=2, cpu_count=4)]
['cpu', 'cpu']
>>> [s.threads for s in plan_slots("cpu", workers=2, cpu_count=4)]
[2, 2]
>>> [s.cuda_visible_devices for s in plan_slots("auto", trials_per_device=2, cuda_count=2)]
['0', '1', '0', '1']
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from hposvc.errors import invalid

if TYPE_CHECKING:  # torch is imported lazily: a parent must set CUDA_VISIBLE_DEVICES first
    import torch

__all__ = [
    "Slot",
    "apply_slot_threads",
    "cuda_device_count",
    "free_device_memory",
    "is_out_of_memory",
    "parse_devices",
    "plan_slots",
    "resolve_device",
    "slot_env",
    "usable_cpu_count",
    "visible_gpu_ids",
]

# Environment variables a worker process reads (set by :func:`slot_env`).
THREADS_ENV = "HPOSVC_WORKER_THREADS"
DEVICE_ENV = "HPOSVC_WORKER_DEVICE"
SLOT_ENV = "HPOSVC_WORKER_SLOT"


@dataclass(frozen=True)
class Slot:
    """One worker process: which device it trains on and how many CPU threads it may use."""

    index: int  # 0-based position among this machine's slots; also the local worker id
    device: str  # torch device *inside* the worker: "cuda:0" (pinned GPU) or "cpu"
    cuda_visible_devices: str | None  # the GPU id the worker is pinned to; None on the CPU
    threads: int  # torch intra-op threads for the worker (OMP/MKL too)


def usable_cpu_count() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's total.

    >>> usable_cpu_count() >= 1
    True
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def cuda_device_count() -> int:
    """Number of GPUs torch can see, without initialising CUDA where NVML can answer.

    ``torch.cuda.device_count()`` asks NVML first, so a parent process that only plans
    slots does not create a CUDA context (which would also break ``fork``).
    """
    import torch

    return int(torch.cuda.device_count())


def visible_gpu_ids(cuda_count: int) -> list[str]:
    """Physical ids of logical GPUs ``0..cuda_count-1``, honouring ``CUDA_VISIBLE_DEVICES``.

    ``CUDA_VISIBLE_DEVICES=2,3`` makes logical GPU 0 the id ``"2"``; ids may also be UUIDs
    (``GPU-…``) or MIG ids, which are passed through unchanged.

    Example: with ``CUDA_VISIBLE_DEVICES=2,3`` set, ``visible_gpu_ids(2)`` is ``['2', '3']``;
    with it unset, ``['0', '1']``.
    """
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(cuda_count)]
    ids = [part.strip() for part in listed.split(",") if part.strip()]
    # CUDA stops at the first invalid entry, and torch's count already reflects that.
    return ids[:cuda_count]


def _describe_visible(cuda_count: int) -> str:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = "" if listed is None else f" with CUDA_VISIBLE_DEVICES={listed!r}"
    return f"torch sees {cuda_count} CUDA GPU{'s' if cuda_count != 1 else ''}{where}"


def parse_devices(devices: str | Sequence[str] | None = "auto", *, cuda_count: int | None = None) -> list[str]:
    """Turn a ``--devices`` value into a list of logical torch devices.

    Accepted: ``"auto"`` or ``None`` (every visible GPU, else the CPU), ``"cpu"``,
    ``"cuda"`` (every visible GPU), a comma-separated list of ``"cuda:N"``, or a sequence of
    those strings. Bad values raise :class:`~hposvc.errors.InvalidInputError` naming the
    devices that exist.

    >>> parse_devices("cuda:1, cuda:0", cuda_count=2)
    ['cuda:1', 'cuda:0']
    >>> parse_devices("auto", cuda_count=0)
    ['cpu']
    """
    count = cuda_device_count() if cuda_count is None else cuda_count
    gpus = [f"cuda:{i}" for i in range(count)]
    allowed = ["auto", "cpu", *(["cuda"] if gpus else []), *gpus]
    allowed_text = "a comma-separated list of " + ", ".join(repr(a) for a in allowed)

    raw = devices if devices is not None else "auto"
    original: Any = raw
    parts = [p.strip() for p in raw.split(",")] if isinstance(raw, str) else [str(p).strip() for p in raw]
    parts = [p.lower() for p in parts if p]
    if not parts:
        raise invalid("devices", original, allowed_text)

    if parts == ["auto"]:
        return gpus or ["cpu"]
    if parts == ["cpu"]:
        return ["cpu"]

    chosen: list[str] = []
    for part in parts:
        if part in ("auto", "cpu"):
            # "cpu,cuda:0" would mix one CPU worker with GPU workers of very different speed.
            raise invalid(
                "devices", original, allowed_text, hint=f"{part!r} must be given alone, not in a list."
            )
        if part == "cuda":
            names = gpus
        elif part.startswith("cuda:") and part[5:].isdigit():
            names = [f"cuda:{int(part[5:])}"]
        else:
            names = []
        if not names or names[0] not in gpus:
            raise invalid("devices", part, allowed_text, hint=_describe_visible(count) + ".")
        for name in names:
            if name in chosen:
                raise invalid("devices", original, allowed_text, hint=f"{name!r} is listed twice.")
            chosen.append(name)
    return chosen


def _parse_workers(workers: int | str | None) -> int | None:
    """``None``/``"auto"`` → None (decide from devices); a positive int or digit string → it."""
    if workers is None or (isinstance(workers, str) and workers.strip().lower() == "auto"):
        return None
    if isinstance(workers, str) and workers.strip().isdigit():
        workers = int(workers.strip())
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise invalid("workers", workers, "a positive integer or 'auto'")
    return workers


def plan_slots(
    devices: str | Sequence[str] | None = "auto",
    *,
    trials_per_device: int = 1,
    workers: int | str | None = None,
    cpu_count: int | None = None,
    cuda_count: int | None = None,
) -> list[Slot]:
    """Plan the worker processes of one machine.

    On GPUs: ``trials_per_device`` slots per chosen GPU (interleaved, so the first slots
    spread over the GPUs), each pinned to its physical GPU id; or, when ``workers`` is a
    number, that many slots round-robin over the GPUs. On the CPU: ``workers`` slots
    (``"auto"``: one per usable core); ``trials_per_device`` counts per GPU and does not
    apply. Every slot gets ``max(1, cores // slots)`` threads so slots do not oversubscribe.
    ``cpu_count``/``cuda_count`` override what the machine reports (tests, planning).

    >>> [(s.device, s.cuda_visible_devices, s.threads) for s in plan_slots("cuda:1", cuda_count=2, cpu_count=8)]
    [('cuda:0', '1', 8)]
    """
    if isinstance(trials_per_device, bool) or not isinstance(trials_per_device, int) or trials_per_device < 1:
        raise invalid("trials_per_device", trials_per_device, "a positive integer")
    n_workers = _parse_workers(workers)
    if cpu_count is not None and (isinstance(cpu_count, bool) or not isinstance(cpu_count, int) or cpu_count < 1):
        raise invalid("cpu_count", cpu_count, "a positive integer")
    cores = usable_cpu_count() if cpu_count is None else cpu_count
    count = cuda_device_count() if cuda_count is None else cuda_count

    chosen = parse_devices(devices, cuda_count=count)
    if chosen == ["cpu"]:
        n = n_workers if n_workers is not None else cores
        threads = max(1, cores // n)
        return [Slot(index=i, device="cpu", cuda_visible_devices=None, threads=threads) for i in range(n)]

    if n_workers is not None and trials_per_device != 1:
        raise invalid(
            "workers",
            workers,
            "'auto' when trials_per_device is given",
            hint="On GPUs give either --workers (total slots) or --trials-per-device (slots per GPU), not both.",
        )
    physical = visible_gpu_ids(count)
    # 1) the order in which slots fill the GPUs: one round over all GPUs, then the next
    rounds = [name for _ in range(trials_per_device) for name in chosen]
    # 2) an explicit worker count cycles through that order
    n = n_workers if n_workers is not None else len(rounds)
    assigned = [rounds[i % len(rounds)] for i in range(n)]
    threads = max(1, cores // n)
    return [
        Slot(index=i, device="cuda:0", cuda_visible_devices=physical[int(name.split(":")[1])], threads=threads)
        for i, name in enumerate(assigned)
    ]


def slot_env(slot: Slot) -> dict[str, str]:
    """Environment variables to add to a worker process for its slot.

    Set them before the worker imports torch: ``CUDA_VISIBLE_DEVICES`` only takes effect
    before CUDA starts. A CPU slot hides every GPU (``CUDA_VISIBLE_DEVICES=""``) so
    ``"auto"`` inside it cannot pick one up.

    >>> slot_env(Slot(index=0, device="cpu", cuda_visible_devices=None, threads=2))["OMP_NUM_THREADS"]
    '2'
    """
    threads = str(slot.threads)
    return {
        "CUDA_VISIBLE_DEVICES": slot.cuda_visible_devices if slot.cuda_visible_devices is not None else "",
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        THREADS_ENV: threads,
        DEVICE_ENV: slot.device,
        SLOT_ENV: str(slot.index),
    }


def apply_slot_threads() -> int | None:
    """In a worker: set torch's thread count from ``HPOSVC_WORKER_THREADS``; return it.

    Returns None (and changes nothing) when the variable is unset, e.g. a worker started
    by hand, where torch's own default applies.

    Example: a worker started with ``slot_env(slot)`` calls ``apply_slot_threads()`` first
    thing and gets ``slot.threads`` back.
    """
    value = os.environ.get(THREADS_ENV)
    if value is None or not value.strip():
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise invalid(THREADS_ENV, value, "a positive integer", source="environment")
    import torch

    threads = int(value)
    torch.set_num_threads(threads)
    return threads


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device training uses: ``"auto"`` (or None) is CUDA if available, else CPU.

    Also takes ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``; asking for a GPU
    that does not exist raises :class:`~hposvc.errors.InvalidInputError`.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    count = cuda_device_count() if torch.cuda.is_available() else 0
    allowed = ["auto", "cpu", *(["cuda"] if count else []), *(f"cuda:{i}" for i in range(count))]
    if text == "cuda" and count:
        return torch.device("cuda")
    if text.startswith("cuda:") and text[5:].isdigit() and int(text[5:]) < count:
        return torch.device(f"cuda:{int(text[5:])}")
    raise invalid("device", spec, allowed, hint=_describe_visible(count) + ".")


def is_out_of_memory(exc: BaseException) -> bool:
    """True if ``exc`` (or an exception it was raised from) means a device ran out of memory.

    Covers ``torch.OutOfMemoryError`` (CUDA), allocator RuntimeErrors ("out of memory",
    CPU "can't allocate memory") and Python's ``MemoryError``, so a worker can fail just
    that trial and keep going.

    >>> is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    True
    """
    import torch

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (torch.OutOfMemoryError, MemoryError)):
            return True
        if isinstance(current, RuntimeError):
            message = str(current).lower()
            if "out of memory" in message or "can't allocate memory" in message:
                return True
        current = current.__cause__ or current.__context__
    return False


def free_device_memory(device: str | torch.device | None = None) -> None:
    """Release what a failed trial left behind: collect garbage, then empty the CUDA cache.

    Call it after the trial's tensors are out of scope (e.g. after an OOM). On the CPU only
    the garbage collection applies.

    >>> free_device_memory("cpu")
    """
    gc.collect()
    import torch

    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and torch.cuda.is_available():
        with torch.cuda.device(torch.device(device) if device is not None else torch.cuda.current_device()):
            torch.cuda.empty_cache()
