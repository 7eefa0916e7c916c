"""The one place that decides device, precision, process rank / world size and seeding.

`session(...)` decides once and undoes on exit what it set process-wide (process group, denormal flushing, heap);
`preserved_rng()` gives a library call its own seeded random streams without touching the caller's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mobilenetv2.cpu_memory import keep_freed_memory, release_freed_memory
from mobilenetv2.errors import UserError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    channels_last: bool = False
    flushes_denormals: bool = False  # this runtime turned CPU denormal flushing on (teardown turns it off)
    compile_model: bool = False  # torch.compile what the loop trains

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """The mixed-precision context for forward passes (a no-op in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Dynamic loss scaling; enabled only for fp16."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def wrap_distributed(self, model: torch.nn.Module) -> torch.nn.Module:
        """What the loop trains: DistributedDataParallel around `model` under torchrun, then torch.compile when asked
        (compiling the DDP module lets torch split graphs at its gradient buckets)."""
        if self.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return torch.compile(model) if self.compile_model else model

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (one small collective under torchrun)."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return bool(tensor.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def share_buffers(self, *modules: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm's running statistics). DDP sends them before each training
        forward, which then updates each rank's copy from its own batch; eval and the checkpoint must see one set."""
        if self.distributed:
            for module in modules:
                for buffer in module.buffers():
                    dist.broadcast(buffer, src=0)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"`device` must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("`device` cuda was asked for but no CUDA GPU is available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"`device` {name}: only {torch.cuda.device_count()} GPU(s) present")
    elif device.type != "cpu":
        raise UserError(f"`device` must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if amp == "fp16" and device.type == "cpu":
        raise UserError("`amp` fp16 needs a GPU; use `amp` bf16 or off on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def setup(device: str = "auto", amp: str = "auto", channels_last: bool = False, compile_model: bool = False,
          dist_timeout: float = 300) -> Runtime:
    """Decide the runtime once. Under torchrun (RANK / WORLD_SIZE set) the process group is started here, with
    collectives that give up after `dist_timeout` seconds (so a dead rank or node ends the job instead of hanging)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    # Denormal floats (tiny gradients and momenta) take a slow path in CPU kernels; flushing them to zero
    # costs nothing in accuracy and ~20 % in CPU training speed (benchmarks/train_throughput.py).
    flushes = resolved.type == "cpu" and not flushing_denormals() and torch.set_flush_denormal(True)
    if resolved.type == "cpu":
        keep_freed_memory()  # no page faults on the same activations every step (cpu_memory.py)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        timeout = datetime.timedelta(seconds=dist_timeout)
        dist.init_process_group(backend=backend, device_id=resolved if resolved.type == "cuda" else None,
                                timeout=timeout, **_attempt_store(rank, world_size, timeout))
    return Runtime(resolved, resolve_amp(amp, resolved), rank, world_size, local_rank, channels_last, flushes,
                   compile_model)


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dict:
    """Under torchrun, the rendezvous store with keys of this restart attempt only: a worker that torchrun restarted
    (`--max-restarts`) must not read the addresses its dead predecessors published (gloo then connects to a port
    nobody listens on and the restarted job fails). Outside torchrun: the default env:// store."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        return {}
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not hosted_by_agent, timeout=timeout)
    return {"store": dist.PrefixStore(f"mobilenetv2/attempt_{attempt}", store), "rank": rank,
            "world_size": world_size}


def flushing_denormals() -> bool:
    """Whether CPU kernels flush denormal floats to zero right now (torch has no getter for it)."""
    return float((torch.tensor([1e-40]) * 1.0).item()) == 0.0


def teardown(runtime: Runtime | None = None) -> None:
    """Undo what `setup` set process-wide: the process group, and denormal flushing where it turned it on."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if runtime is not None and runtime.flushes_denormals:
        torch.set_flush_denormal(False)
    if runtime is not None and runtime.device.type == "cpu":
        release_freed_memory()


@contextlib.contextmanager
def session(device: str = "auto", amp: str = "auto", channels_last: bool = False, compile_model: bool = False,
            dist_timeout: float = 300):
    """`setup` on entry, `teardown` on exit."""
    runtime = setup(device, amp, channels_last, compile_model, dist_timeout)
    try:
        yield runtime
    finally:
        teardown(runtime)


@contextlib.contextmanager
def preserved_rng():
    """Inside, seed freely; on exit the Python, NumPy, torch (and CUDA) random states are what they were."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """All RNG states as plain data (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


# --amp auto on a CPU: bf16 only where this CPU runs this training step that much faster than fp32, timed here
BF16_MARGIN = 1.15  # below it fp32 stays: full precision, and the run's loss curve as on every other CPU
AMP_TIMING_STEPS = 2  # timed steps per precision and round, after two warm-up steps each
AMP_TIMING_ROUNDS = 2
AMP_TIMING_PIXELS = 1 << 21  # a timed batch holds the run's batch or fewer images: 41 at 224 px (256 took minutes)
AMP_TIMING_METHOD = 2  # in the key: timings from before the in-place ReLU6 and kept heap (fp32 got faster) are redone


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def user_cache() -> Path:
    """The user's cache folder for what this package keeps between runs (timings, exports it cannot put beside
    their checkpoint)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mobilenetv2"


CPUINFO_BYTES = 1 << 16  # the first processor's entry is well inside this


def cpu_fields(cpuinfo: str | None = None) -> dict[str, str]:
    """The first processor's entry of /proc/cpuinfo (`cpuinfo`: its text, read here when None) as name -> value;
    the other entries repeat it. Empty where the OS has none."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", "rb") as file:
                cpuinfo = file.read(CPUINFO_BYTES).decode("utf-8", "replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _time_precisions(model: torch.nn.Module, runtime: Runtime, batch: int, size: int, classes: int) -> dict:
    """Training images/s of a copy of `model` at this batch and size, in fp32 and in bf16 autocast, steps taken
    in turn so a slow spell of the machine falls on both."""
    import copy
    import time

    network = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-6, momentum=0.9)

    def step(dtype):
        context = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
        with context:
            loss = torch.nn.functional.cross_entropy(network(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = {"fp32": 0.0, "bf16": 0.0}
    with preserved_rng():  # the run's random streams are the same whether it timed here or read the record
        images = runtime.to_input(torch.randn(batch, 3, size, size))
        labels = torch.randint(0, classes, (batch,))
        for _ in range(2):
            for dtype in (None, torch.bfloat16):
                step(dtype)  # warm-up: oneDNN builds its kernels, the allocator its pools
        for _ in range(AMP_TIMING_ROUNDS):
            for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                start = time.perf_counter()
                for _ in range(AMP_TIMING_STEPS):
                    step(dtype)
                seconds[name] += time.perf_counter() - start
    return {name: AMP_TIMING_ROUNDS * AMP_TIMING_STEPS * batch / value for name, value in seconds.items()}


def tune_cpu_amp(runtime: Runtime, amp: str, model: torch.nn.Module, batch: int, size: int,
                 classes: int) -> tuple[Runtime, str | None]:
    """`--amp auto` on a CPU: the runtime with bf16 autocast when this CPU trains `model` at this batch and size at
    least BF16_MARGIN times faster in bf16 than in fp32, else unchanged (fp32); and a line saying what was decided.
    The timing (a few steps of a copy of the model) is kept in the user's cache per CPU, threads, torch, network,
    batch, size and memory format, so later runs (and resumed ones) decide alike without timing again; under
    torchrun every rank takes rank 0's decision."""
    if amp != "auto" or runtime.device.type != "cpu":
        return runtime, None
    if not cpu_has_bf16():
        return runtime, "amp auto: fp32 (this CPU has no native bf16)"
    from mobilenetv2.files import keep_record, read_record

    parameters = sum(p.numel() for p in model.parameters())
    batch = max(1, min(batch, AMP_TIMING_PIXELS // (size * size)))  # images/s per precision barely moves past it
    import platform

    cpu = cpu_fields().get("model name") or platform.processor() or platform.machine()
    key = (f"timing {AMP_TIMING_METHOD} | {cpu} | {torch.get_num_threads()} threads | torch {torch.__version__} | "
           f"{parameters} parameters | batch {batch} | {size} px | {'channels-last' if runtime.channels_last else 'NCHW'}")
    record = user_cache() / "amp_timings.json"
    known = read_record(record)
    rates = known.get(key)
    timed_now = set(rates or ()) != {"fp32", "bf16"}
    if timed_now:
        rates = _time_precisions(model, runtime, batch, size, classes)
        keep_record(record, {**known, key: rates})
    ratio = rates["bf16"] / rates["fp32"]
    choice = torch.tensor([float(ratio >= BF16_MARGIN)], device=runtime.device)
    if runtime.distributed:  # rank 0's decision
        dist.broadcast(choice, src=0)
    bf16 = bool(choice.item())
    source = "timed now" if timed_now else f"timing kept in {record}"
    note = (f"amp auto: {'bf16' if bf16 else 'fp32'} (bf16 trains this model {ratio:.2f}x as fast as fp32 on this "
            f"CPU, timed at batch {batch}, {size} px; {source})")
    return (dataclasses.replace(runtime, amp_dtype=torch.bfloat16) if bf16 else runtime), note

