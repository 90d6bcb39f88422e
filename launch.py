"""Processes, for train_imagenet.py and sample.py: one by default (no process group; CUDA if there is
one), `--gpus N` spawns N on this machine (NCCL, or gloo with --device cpu, whose processes then share
the cores), and under torchrun they are found from RANK, WORLD_SIZE and LOCAL_RANK.

    launch(worker, args, gpus, device)    runs worker(args, rank, local_rank, world_size) in each process
    setup_process(...)                    a worker's first call: its device and the process group
    split_batch, rank0_first, no_sync,    the training loop's multi-process pieces: this rank's rows of the
    mean_over_ranks, stop_requests        global batch, ordering, gradient all-reduce, Ctrl-C / SIGTERM
    exit_worker()                         a worker's last call
    status_line                           train_imagenet.py's status line, with
    peak_memory_gib, format_duration      its memory and ETA
"""
import contextlib
import os
import resource
import signal
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel


def under_torchrun():
    """Whether torchrun started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(worker, args, gpus, device, before_spawn=None, user_errors=()):
    """Run worker(args, rank, local_rank, world_size) in every process of the run. --gpus N: first
    before_spawn() in this process (train_imagenet.py builds a missing dataset cache there, once); then
    Ctrl-C reaches every process of the terminal's group by itself, and SIGTERM is forwarded to them.
    A user_errors exception inside a spawned process is the same one line and exit code 2 as in a
    single process, not a traceback wrapped in the spawn's."""
    if under_torchrun():
        if gpus != 1:
            raise ValueError("--gpus is for a single-machine launch; under torchrun use --nproc_per_node")
        world_size = int(os.environ["WORLD_SIZE"])
        worker(args, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), world_size)
        if world_size > 1:
            exit_worker()
    elif gpus > 1:
        if device != "cpu" and torch.cuda.device_count() < gpus:
            raise ValueError(f"--gpus {gpus}, but {torch.cuda.device_count()} CUDA devices are visible "
                             f"(--device cpu runs CPU processes)")
        if before_spawn:
            before_spawn()
        with socket.socket() as sock:                               # a free port for the process group
            sock.bind(("localhost", 0))
            os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(sock.getsockname()[1]))
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            context = mp.spawn(_spawned, args=(worker, args, gpus, user_errors), nprocs=gpus, join=False)

            def forward(signum, frame):
                for process in context.processes:
                    if process.is_alive():
                        os.kill(process.pid, signum)

            sigterm = signal.signal(signal.SIGTERM, forward)
            try:
                while not context.join():
                    pass
            except mp.ProcessExitedException as error:
                if error.exit_code == 2:                            # the worker printed the user's mistake
                    raise SystemExit(2) from None
                raise
            finally:
                signal.signal(signal.SIGTERM, sigterm)
        finally:
            signal.signal(signal.SIGINT, sigint)
    else:
        worker(args)


def _spawned(local_rank, worker, args, world_size, user_errors):
    signal.signal(signal.SIGINT, signal.default_int_handler)       # the parent ignores Ctrl-C, not us
    try:
        worker(args, rank=local_rank, local_rank=local_rank, world_size=world_size)
    except user_errors as error:                                    # most checks run on rank 0 only: one line
        print(f"{os.path.basename(sys.argv[0])}: error (rank {local_rank}): {error}", file=sys.stderr)
        exit_worker(2)
    exit_worker()


def setup_process(device, rank, local_rank, world_size):
    """Resolve --device (auto: CUDA if there is one), pin this process's GPU, and join the process
    group when there are several processes (NCCL on CUDA, gloo on CPU, whose processes then share
    the cores). Returns (the resolved --device string, the torch.device)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if world_size > 1:
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo", rank=rank,
                                world_size=world_size, device_id=torch_device if torch_device.type == "cuda" else None)
        if torch_device.type == "cpu":
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            torch.set_num_threads(max(1, torch.get_num_threads() // local_world))
    return device, torch_device


def split_batch(B, batch_gpu, rank, world_size):
    """This rank's rows of the global batch B = world_size x rounds x batch_gpu, a slice per
    accumulation round. batch_gpu None: all the rank's rows at once."""
    if B % world_size:
        raise ValueError(f"--batch {B} is not divisible by the {world_size} processes")
    per_rank = B // world_size
    batch_gpu = min(batch_gpu or per_rank, per_rank)
    if per_rank % batch_gpu:
        raise ValueError(f"--batch-gpu {batch_gpu} does not divide the {per_rank} samples per process")
    first = rank * per_rank
    return [slice(first + a * batch_gpu, first + (a + 1) * batch_gpu) for a in range(per_rank // batch_gpu)]


def no_sync(net, accumulating):
    """DDP's no_sync while accumulating: only the last micro-batch's backward all-reduces."""
    if accumulating and isinstance(net, DistributedDataParallel):
        return net.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def stop_requests(rank):
    """Ctrl-C and SIGTERM append to the yielded list instead of stopping the process, so that the
    loop can finish its step and save; the loop all-reduces the request, so all ranks stop together."""
    received = []

    def request_stop(signum, frame):
        if not received and rank == 0:
            print(f"{signal.Signals(signum).name}: saving the training state after this step")
        received.append(signum)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def mean_over_ranks(params, world_size):
    """Replace each gradient by its mean over the ranks (for the small heads, which are not under DDP)."""
    if world_size > 1:
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= world_size


@contextlib.contextmanager
def rank0_first(rank, world_size):
    """Rank 0 runs the block first (e.g. builds a missing dataset cache), then the other ranks."""
    if rank != 0:
        dist.barrier()
    yield
    if rank == 0 and world_size > 1:
        dist.barrier()


def exit_worker(code=0):
    """End a process of a process group once its work is done and saved, skipping interpreter
    shutdown: there, gloo's threads abort the process now and then ("terminate called without an
    active exception"; 2 of 30 two-process runs here, 0 of 40 with this exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def format_duration(seconds):
    """12:05 for 12 min 5 s, 1:02:03 beyond an hour (the status line's ETA)."""
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


def peak_memory_gib(device):
    """Peak CUDA memory allocated, or on a CPU the process's peak resident memory (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def status_line(stats, stage, loss):
    """train_imagenet.py's status line, which rank 0 prints (log.jsonl gets the same figures)."""
    return (f"kimg {stats['kimg']:<8.2f} step {stats['step']:<7d} loss {stats['loss']:<8.3g} lr {stats['lr']:<8.2e} "
            + (f"r {stats['r']:<5.3f} " if loss == "emd" else "")
            + (f"D {stats['d_loss']:<6.3f} G_adv {stats['g_adv']:<6.3f} "
               f"D(real)-D(fake) {stats['d_real_minus_fake']:<+7.3f} " if stage == "adv" else "")
            + f"sec/kimg {stats['sec_per_kimg']:<7.2f} mem {stats['mem_gib']:.2f} GiB skipped {stats['skipped']} "
            + f"eta {format_duration(stats['eta_sec'])}")
