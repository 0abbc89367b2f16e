"""Native (C) loops for sequential steps, loaded with ctypes.

Some recurrences are a long run of tiny steps, where PyTorch spends a dispatch (~2 us) per op on
a few thousand flops:
- the FWM write's clip factors make every position of a chunk depend on the one before;
  ``csrc/fwm_chunked_impl.h`` runs the whole chunkwise write one sequence at a time, those
  steps (``csrc/fwm_steps_impl.h``) between the chunk's small matrix products
  (``csrc/matmul_impl.h``), so nothing of the batch goes to memory between operations; for
  tiny states ``csrc/fwm_sequential_impl.h`` runs it one position at a time;
- the delta rule's answer to one query carries the query backwards through the writes, O(D_k)
  per position (``csrc/delta_answer_impl.h``);
- the retrieval model's input projection is two row lookups and a sum, which PyTorch makes as
  three passes over [B * L, D_key] (and two index_adds back); ``csrc/gather_add_impl.h`` makes
  one;
- DPFP-nu's kernel phi(q) . phi(k) is a few passes of width 2 D_k per (query, key) pair, which
  PyTorch makes as separate passes over a [B, Q, L, 2 D_k] block; ``csrc/dpfp_kernel_impl.h``
  makes one pass per pair, forward and backward, and keeps no block;
- DPFP-nu's features are a cat, a neg, a relu, nu rolls, nu products and a cat in PyTorch, each
  a pass over [B, L, 2 D_k] or wider (and about twice as many back);
  ``csrc/dpfp_features_impl.h`` makes one pass each way;
- the sum normalisation x / (sum x + eps) of the delta rule's features is three passes in
  PyTorch and about six back; ``csrc/sum_normalise_impl.h`` makes one each way;
- FAVOR+'s kernel turns the projections [B, Q, L, m] into exp(+-s - c), their sum and their
  difference, which PyTorch makes as eight passes; ``csrc/favor_kernel_impl.h`` makes one,
  with a float32 exp that vectorises (``csrc/expf_impl.h``);
- elu(x) + 1 and tanh, the feature maps of Linear and of the tanh FWM, are two passes and a
  slow exp in PyTorch; ``csrc/pointwise_impl.h`` makes one pass each way.
All are compiled from ``csrc/steps.c``, which includes each once per precision (the two
precisions as two compiler processes at once, then linked).

The sources are compiled on first use into one library, with the system's C compiler (``$CC``,
else ``cc``), in a cache directory (``$FWR_CACHE_DIR``, else
``$XDG_CACHE_HOME/fastweight-retrieval``, else ``~/.cache/fastweight-retrieval``), under a name
that hashes the sources, the flags and the machine, so processes sharing the cache never load a
stale build. No -march=native and no -ffast-math (no reassociation, no fused multiply-add):
every machine computes the same floats. On x86-64 Linux with gcc the loops also get AVX2
clones (the exp loops also AVX-512) picked at load time; they round exactly as the baseline
build (-DFWR_NO_CLONES), which a test checks. Without a compiler, or with ``FWR_NATIVE=0``,
``steps()`` returns None and the PyTorch forms run (the same arithmetic, rounded differently;
the projection's lookups alone give the same floats either way); ``kernel_name()`` says which,
and every stored run of a model with a native form records it.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "steps.c"]
HEADERS = [CSRC / "dot_impl.h", CSRC / "fwm_steps_impl.h", CSRC / "matmul_impl.h",
           CSRC / "fwm_chunked_impl.h", CSRC / "fwm_sequential_impl.h",
           CSRC / "delta_answer_impl.h", CSRC / "dpfp_kernel_impl.h",
           CSRC / "dpfp_features_impl.h", CSRC / "sum_normalise_impl.h",
           CSRC / "gather_add_impl.h",
           CSRC / "expf_impl.h", CSRC / "favor_kernel_impl.h", CSRC / "pointwise_impl.h"]
FUNCTIONS = ["delta_answer_forward", "delta_answer_backward",
             "dpfp_kernel_forward", "dpfp_kernel_backward", "dpfp_features_forward",
             "dpfp_features_backward", "dpfp_normalised_forward", "dpfp_normalised_backward",
             "sum_normalise_forward", "sum_normalise_backward",
             "favor_kernel_forward",
             "elu_plus_one_forward", "elu_plus_one_backward", "tanh_forward", "tanh_backward"]
CHECKED_FUNCTIONS = ["gather_add_forward", "gather_add_backward",   # return 1 on a bad id
                     "favor_projected_forward", "favor_projected_backward",
                     "dpfp_projected_kernel_forward", "dpfp_projected_kernel_backward",
                     "elu_plus_one_lookup_forward", "elu_plus_one_lookup_backward",
                     "tanh_lookup_forward", "tanh_lookup_backward",
                     "elu_plus_one_lookup_features_backward", "tanh_lookup_features_backward",
                     "fwm_chunked_forward", "fwm_chunked_backward",
                     "fwm_sequential_forward", "fwm_sequential_backward"]
# -fno-trapping-math lets branches on a float compare become selects (no value changes: no
# reassociation, no contraction); random signs made the branches mispredict half the time.
FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off",
         "-fno-trapping-math"]
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
PRECISIONS = (32, 64)                 # csrc/steps.c's FWR_PRECISION: one object file each
LOOKUP_IDS = "index out of range in the projection's lookups"   # an id outside its table


def cache_dir() -> Path:
    if os.environ.get("FWR_CACHE_DIR"):
        return Path(os.environ["FWR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastweight-retrieval"


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob("tmp*"):          # left by a process killed mid-build
        try:
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        except OSError:
            pass
    # Build beside the target and rename: processes compiling at once never see half a file.
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as objects:
            # Each precision compiled by its own process, at once, then linked.
            compile_flags = [flag for flag in FLAGS if flag != "-shared"]
            jobs = [subprocess.Popen([compiler, *compile_flags, f"-DFWR_PRECISION={bits}", "-c",
                                      *map(str, SOURCES), "-o", f"{objects}/steps{bits}.o"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                    for bits in PRECISIONS]
            _finish(jobs)
            subprocess.run([compiler, *FLAGS, *(f"{objects}/steps{bits}.o" for bits in PRECISIONS),
                            "-o", partial, "-lm"], check=True, capture_output=True, timeout=120)
        os.chmod(partial, 0o755)             # mkstemp's 0600 would lock out a shared cache's users
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _finish(jobs: list[subprocess.Popen], timeout: float = 120) -> None:
    """Wait for every compiler process; CalledProcessError (or TimeoutExpired) if one fails,
    with none left running."""
    try:
        for job in jobs:
            _, err = job.communicate(timeout=timeout)
            if job.returncode:
                raise subprocess.CalledProcessError(job.returncode, job.args, stderr=err)
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()


def build_path(compiler: str) -> Path:
    """Where the cache keeps the build of these sources with this compiler and these flags."""
    code = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    setup = " ".join([compiler, *FLAGS, platform.machine(), platform.system()])
    key = hashlib.sha256(code + setup.encode()).hexdigest()
    return cache_dir() / f"native-{key[:16]}.so"


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("FWR_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or not all(path.is_file() for path in (*SOURCES, *HEADERS)):
        return None
    target = build_path(compiler)
    try:
        if not target.is_file():
            _compile(compiler, target)
        try:
            library = ctypes.CDLL(str(target))
        except OSError:                       # a damaged cached build: build it again, once
            _compile(compiler, target)
            library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    for suffix in SUFFIX.values():
        for name in FUNCTIONS:
            getattr(library, f"{name}_{suffix}").restype = None
        for name in CHECKED_FUNCTIONS:
            getattr(library, f"{name}_{suffix}").restype = ctypes.c_int
    return library


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:                                  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def steps(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The compiled library if it can run the steps for these tensors (all on the CPU, all
    float32 or all float64, no autocast changing the dtype of what is computed from them, no
    torch.func transform, whose batched tensors have no plain buffer), else None."""
    first = tensors[0]
    if (first.device.type != "cpu" or first.dtype not in SUFFIX or _autocast_on()
            or torch._C._are_functorch_transforms_active()
            or any(x.dtype != first.dtype or x.device != first.device for x in tensors)):
        return None
    return _library()


def kernel_name() -> str:
    """'native' if the compiled steps (FWM write, delta-rule answers, DPFP and FAVOR+ kernels,
    ELU + 1 and tanh features, sum normalisation, projection lookups) run on this machine,
    else 'torch'."""
    return "native" if _library() is not None else "torch"


def _pointers(dtype: torch.dtype, *tensors: torch.Tensor | None) -> list:
    """Raw pointers for C; every tensor must be a contiguous CPU tensor of this dtype. The
    pointers do not keep the tensors alive: the caller holds them (named) until C returns."""
    for x in tensors:
        if x is not None and (x.dtype is not dtype or not x.is_cpu or not x.is_contiguous()):
            raise ValueError(f"the native steps take contiguous CPU {dtype} tensors, got "
                             f"{x.dtype} on {x.device}{'' if x.is_contiguous() else ', strided'}")
    return [None if x is None else ctypes.c_void_p(x.data_ptr()) for x in tensors]


def _row_pointers(dtype: torch.dtype, rows: int, r0: int, *tensors: torch.Tensor) -> list:
    """``_pointers`` to row r0 of each tensor, read as `rows` rows of equal width (a slice
    per range costs a few microseconds a tensor: several percent of a small training step)."""
    pointers = _pointers(dtype, *tensors)
    if r0:
        for i, x in enumerate(tensors):
            offset = r0 * (x.numel() // rows) * x.element_size()
            pointers[i] = ctypes.c_void_p(pointers[i].value + offset)
    return pointers


def _values(dtype: torch.dtype, values: torch.Tensor, one_hot: bool) -> list:
    """Pointers (V, ids) for the FWM steps: dense values V [B, C, D], or one-hot ids [B, C]."""
    return [None, _ids(values)] if one_hot else [*_pointers(dtype, values), None]


def fwm_chunked_forward(library, k, values, b, chunk: int, d_value: int | None = None,
                        keep: bool = False):
    """The whole chunkwise FWM write in C, one sequence at a time (csrc/fwm_chunked_impl.h):
    k [B, L, D_k], values V [B, L, D_v] or, with d_value = D_v, one-hot ids [B, L] (int64),
    b [B, L], all contiguous, L >= 1 -> (S [B, D_k, D_v], the final state, and with keep the
    backward's inputs, else None). Sequences split over torch's threads (each sequence alone:
    no float changes). IndexError for an id outside 0..D_v-1."""
    B, L, D_k = k.shape
    D_v = d_value if d_value is not None else values.shape[2]
    C = int(chunk)
    if L == 0:
        raise ValueError("the chunkwise FWM write needs at least one position")
    nc = -(-L // C)
    S = k.new_empty(B, D_k, D_v)
    if keep:                   # the states entering chunks 1.., the steps' quantities
        kept = (k.new_empty(B, nc - 1, D_k, D_v), *(k.new_empty(B, L) for _ in range(5)),
                k.new_empty(B, nc, C, C), k.new_empty(B, nc, C, C), k.new_empty(B, L, D_v),
                k.new_empty(B, L, D_v))
    else:
        kept = (None,) * 10
    states, hk, n_pre, c, g, d, E, w, U, r = kept
    function = getattr(library, f"fwm_chunked_forward_{SUFFIX[k.dtype]}")

    def run(b0: int, b1: int) -> int:
        scratch = k.new_empty(3 * C * C + 3 * C * D_v + 2 * C * D_k + D_v + 5 * C)  # named
        return function(ctypes.c_long(b0), ctypes.c_long(b1), ctypes.c_long(L),
                        ctypes.c_long(C), ctypes.c_long(D_k), ctypes.c_long(D_v),
                        *_pointers(k.dtype, k),
                        *_values(k.dtype, values, d_value is not None),
                        *_pointers(k.dtype, b, S, states), ctypes.c_int(int(keep)),
                        *_pointers(k.dtype, hk, E, w, U, r, n_pre, c, g, d, scratch))

    _over_batch_checked(B, 2 * B * L * D_k * D_v, run,
                        f"a one-hot value id outside 0..{D_v - 1} in the FWM write")
    return S, (kept if keep else None)


def fwm_chunked_backward(library, k, values, b, chunk: int, kept, S_bar,
                         d_value: int | None = None, values_grad: bool = False):
    """Gradients (k_bar [B, L, D_k], b_bar [B, L], v_bar [B, L, D_v] or None) of
    ``fwm_chunked_forward`` for dLoss/dS = S_bar [B, D_k, D_v] (contiguous), from what its
    forward kept. v_bar only for dense values asked for (values_grad)."""
    B, L, D_k = k.shape
    D_v = S_bar.shape[2]
    C = int(chunk)
    states, hk, n_pre, c, g, d, E, w, U, r = kept
    k_bar, b_bar = k.new_empty(B, L, D_k), k.new_empty(B, L)
    v_bar = k.new_empty(B, L, D_v) if values_grad and d_value is None else None
    function = getattr(library, f"fwm_chunked_backward_{SUFFIX[k.dtype]}")

    def run(b0: int, b1: int) -> int:
        scratch = k.new_empty((D_k + max(D_k, C) + 3 * C) * D_v + C * C + 2 * C * D_k
                              + 2 * D_v + 2 * C)
        return function(ctypes.c_long(b0), ctypes.c_long(b1), ctypes.c_long(L),
                        ctypes.c_long(C), ctypes.c_long(D_k), ctypes.c_long(D_v),
                        *_pointers(k.dtype, k),
                        *_values(k.dtype, values, d_value is not None),
                        *_pointers(k.dtype, b, states, hk, E, w, U, r, n_pre, c, g, d,
                                   S_bar, k_bar, b_bar, v_bar, scratch))

    _over_batch_checked(B, 4 * B * L * D_k * D_v, run,
                        f"a one-hot value id outside 0..{D_v - 1} in the FWM write")
    return k_bar, b_bar, v_bar


def fwm_sequential_forward(library, k, values, b, d_value: int | None = None, keep: bool = False):
    """The whole FWM write one position at a time (csrc/fwm_sequential_impl.h): k [B, L, D_k],
    values V [B, L, D_v] or, with d_value = D_v, one-hot ids [B, L] (int64), b [B, L], all
    contiguous -> W [B, D_v, D_k], the final state transposed, and with keep the backward's
    inputs (r, u [B, L, D_v], n', c [B, L]), else None. Sequences split over torch's threads
    (each sequence alone: no float changes). IndexError for an id outside 0..D_v-1."""
    B, L, D_k = k.shape
    D_v = d_value if d_value is not None else values.shape[2]
    if L == 0:
        raise ValueError("the sequential FWM write needs at least one position")
    W = k.new_empty(B, D_v, D_k)
    kept = (k.new_empty(B, L, D_v), k.new_empty(B, L, D_v), k.new_empty(B, L),
            k.new_empty(B, L)) if keep else (None,) * 4
    function = getattr(library, f"fwm_sequential_forward_{SUFFIX[k.dtype]}")

    def run(b0: int, b1: int) -> int:
        scratch = k.new_empty(3 * D_v)                  # named: held until C returns
        return function(ctypes.c_long(b0), ctypes.c_long(b1), ctypes.c_long(L),
                        ctypes.c_long(D_k), ctypes.c_long(D_v), *_pointers(k.dtype, k),
                        *_values(k.dtype, values, d_value is not None),
                        *_pointers(k.dtype, b, W, *kept, scratch))

    _over_batch_checked(B, 2 * B * L * D_k * D_v, run,
                        f"a one-hot value id outside 0..{D_v - 1} in the FWM write")
    return W, (kept if keep else None)


def fwm_sequential_backward(library, k, values, b, kept, W_bar, interval: int,
                            d_value: int | None = None, values_grad: bool = False):
    """Gradients (k_bar [B, L, D_k], b_bar [B, L], v_bar [B, L, D_v] or None) of
    ``fwm_sequential_forward`` for dLoss/dW = W_bar [B, D_v, D_k], from what its forward kept,
    each sequence's states built again with a checkpoint every `interval` positions. v_bar only
    for dense values asked for (values_grad)."""
    B, L, D_k = k.shape
    D_v = W_bar.shape[1]
    if L == 0:
        raise ValueError("the sequential FWM write needs at least one position")
    k_bar, b_bar = k.new_empty(B, L, D_k), k.new_empty(B, L)
    v_bar = k.new_empty(B, L, D_v) if values_grad and d_value is None else None
    work_size = (-(-L // interval) + interval + 1) * D_v * D_k + 4 * D_v + D_k
    function = getattr(library, f"fwm_sequential_backward_{SUFFIX[k.dtype]}")

    def run(b0: int, b1: int) -> int:
        work = k.new_empty(work_size)                   # named: held until C returns
        return function(ctypes.c_long(b0), ctypes.c_long(b1), ctypes.c_long(L),
                        ctypes.c_long(D_k), ctypes.c_long(D_v), ctypes.c_long(interval),
                        *_pointers(k.dtype, k),
                        *_values(k.dtype, values, d_value is not None),
                        *_pointers(k.dtype, b, *kept, W_bar, k_bar, b_bar, v_bar, work))

    _over_batch_checked(B, 6 * B * L * D_k * D_v, run,
                        f"a one-hot value id outside 0..{D_v - 1} in the FWM write")
    return k_bar, b_bar, v_bar


def delta_answer_forward(library, q, k, beta):
    """The delta rule's backward-carried query (csrc/delta_answer_impl.h): q [B, Q, D], k [B, L, D],
    beta [B, L] (contiguous, one dtype) -> weights w [B, L, Q] and, for the backward, z [B, L, Q]
    and the carried queries hs [B, L, Q, D]."""
    B, L, D = k.shape
    Q = q.shape[1]
    w, z = k.new_empty(B, L, Q), k.new_empty(B, L, Q)
    hs, scratch = k.new_empty(B, L, Q, D), k.new_empty(Q, D)
    getattr(library, f"delta_answer_forward_{SUFFIX[k.dtype]}")(
        ctypes.c_long(B), ctypes.c_long(L), ctypes.c_long(Q), ctypes.c_long(D),
        *_pointers(k.dtype, q, k, beta, w, z, hs, scratch))
    return w, z, hs


def delta_answer_backward(library, dw, k, beta, z, hs):
    """Gradients (dq [B, Q, D], dk [B, L, D], dbeta [B, L]) of ``delta_answer_forward``'s w."""
    B, L, D = k.shape
    Q = dw.shape[2]
    dq, dk, dbeta = k.new_empty(B, Q, D), k.new_empty(B, L, D), k.new_empty(B, L)
    scratch = k.new_empty(Q, D)          # named: a temporary would be freed before the call
    getattr(library, f"delta_answer_backward_{SUFFIX[k.dtype]}")(
        ctypes.c_long(B), ctypes.c_long(L), ctypes.c_long(Q), ctypes.c_long(D),
        *_pointers(k.dtype, dw, k, beta, z, hs, dq, dk, dbeta, scratch))
    return dq, dk, dbeta


# Below this many (pair x feature) products, one thread does the whole batch.
PARALLEL_MIN_WORK = 1 << 20


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fwr-native")


def _over_batch(B: int, work: int, run, blocks: int | None = None) -> None:
    """run(b0, b1) over the batch, split into torch.get_num_threads() ranges when there is
    enough work: the first in the calling thread, the others in a pool's threads (ctypes
    releases the GIL). Each range's results depend on that range alone, so the split does not
    change a single float. With ``blocks``, the ranges hold whole blocks of B / blocks
    (stacked models' members, whose gradients land in their own tables' rows)."""
    if blocks is None:
        blocks = B
    elif B % blocks:
        blocks = 1                        # ranges of whole blocks only
    threads = min(blocks, torch.get_num_threads())
    if threads <= 1 or work < PARALLEL_MIN_WORK:
        run(0, B)
        return
    bounds = [B // blocks * (blocks * i // threads) for i in range(threads + 1)]
    futures = [_pool(threads - 1).submit(run, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    try:
        run(bounds[0], bounds[1])
    finally:
        for future in futures:
            future.result()


def _over_batch_checked(B: int, work: int, run, message: str, blocks: int | None = None) -> None:
    """``_over_batch`` of a run(b0, b1) that returns its C function's status: IndexError(message)
    if a range found an id outside its table (status 1; that range wrote nothing)."""
    failed = []
    if B:
        _over_batch(B, work, lambda b0, b1: failed.append(run(b0, b1)), blocks)
    if any(failed):
        raise IndexError(message)


def dpfp_kernel_forward(library, q, k, nu: int):
    """DPFP-nu's phi(q) . phi(k) (csrc/dpfp_kernel_impl.h): q [B, Q, D], k [B, L, D]
    -> [B, Q, L]."""
    B, Q, D = q.shape
    L, W = k.shape[1], 2 * D
    K = q.new_empty(B, Q, L)
    function = getattr(library, f"dpfp_kernel_forward_{SUFFIX[q.dtype]}")

    def run(b0: int, b1: int) -> None:
        scratch = q.new_empty((Q + 3) * W + 2 * nu + D)     # named: held until C returns
        function(ctypes.c_long(b0), ctypes.c_long(b1), ctypes.c_long(Q), ctypes.c_long(L),
                 ctypes.c_long(D), ctypes.c_long(nu), *_pointers(q.dtype, q, k, K, scratch))

    _over_batch(B, B * Q * L * W * (nu + 2), run)
    return K


def dpfp_kernel_backward(library, g, q, k, nu: int):
    """Gradients (dq [B, Q, D], dk [B, L, D]) of ``dpfp_kernel_forward`` for
    dLoss/dK = g [B, Q, L]."""
    B, Q, D = q.shape
    L, W = k.shape[1], 2 * D
    dq, dk = q.new_empty(B, Q, D), k.new_empty(B, L, D)
    function = getattr(library, f"dpfp_kernel_backward_{SUFFIX[q.dtype]}")

    def run(b0: int, b1: int) -> None:
        scratch = q.new_empty((2 * Q + 3) * W + 2 * nu + 2 * D)   # named: held until C returns
        function(ctypes.c_long(b0), ctypes.c_long(b1), ctypes.c_long(Q), ctypes.c_long(L),
                 ctypes.c_long(D), ctypes.c_long(nu),
                 *_pointers(q.dtype, g, q, k, dq, dk, scratch))

    _over_batch(B, B * Q * L * W * (2 * nu + 6), run)
    return dq, dk


def dpfp_projected_kernel_forward(library, q, A, a, C, c, nu: int):
    """``dpfp_kernel_forward`` for keys given as two row lookups k_bt = A[a_bt] + C[c_bt]:
    tables A [NA, D], C [NC, D], ids a, c [B, L] int64 (one dtype, contiguous) -> [B, Q, L],
    the floats of the formed keys' kernel. IndexError for an id outside its table."""
    B, Q, D = q.shape
    L, W = a.shape[1], 2 * D
    K = q.new_empty(B, Q, L)
    function = getattr(library, f"dpfp_projected_kernel_forward_{SUFFIX[q.dtype]}")

    def run(b0: int, b1: int) -> int:
        scratch = q.new_empty((Q + 3) * W + 2 * nu + D)     # named: held until C returns
        return function(
            ctypes.c_long(b0), ctypes.c_long(b1), ctypes.c_long(Q), ctypes.c_long(L),
            ctypes.c_long(D), ctypes.c_long(nu), *_pointers(q.dtype, q, A),
            ctypes.c_long(A.shape[0]), _ids(a), *_pointers(q.dtype, C), ctypes.c_long(C.shape[0]),
            _ids(c), *_pointers(q.dtype, K, scratch))

    _over_batch_checked(B, B * Q * L * W * (nu + 2), run, LOOKUP_IDS)
    return K


def dpfp_projected_kernel_backward(library, g, q, A, a, C, c, nu: int, members: int = 1):
    """Gradients (dq [B, Q, D], dA [NA, D], dC [NC, D]) of ``dpfp_projected_kernel_forward``
    for dLoss/dK = g [B, Q, L]: the floats of ``dpfp_kernel_backward`` followed by
    ``gather_add_backward``. Every key's gradient lands in the shared tables, so one thread
    per member: ``members`` stacked models, each B / members sequences reading its own rows of
    the tables (``_over_batch``'s blocks; one model: one thread)."""
    B, Q, D = q.shape
    L, W = a.shape[1], 2 * D
    dq, dA, dC = q.new_empty(B, Q, D), A.new_zeros(A.shape), C.new_zeros(C.shape)
    function = getattr(library, f"dpfp_projected_kernel_backward_{SUFFIX[q.dtype]}")

    def run(b0: int, b1: int) -> int:
        scratch = q.new_empty((2 * Q + 3) * W + 2 * nu + 2 * D)   # named: held until C returns
        return function(
            ctypes.c_long(b0), ctypes.c_long(b1), ctypes.c_long(Q), ctypes.c_long(L),
            ctypes.c_long(D), ctypes.c_long(nu), *_pointers(q.dtype, g, q, A),
            ctypes.c_long(A.shape[0]), _ids(a), *_pointers(q.dtype, C), ctypes.c_long(C.shape[0]),
            _ids(c), *_pointers(q.dtype, dq, dA, dC, scratch))

    _over_batch_checked(B, B * Q * L * W * (2 * nu + 6), run, LOOKUP_IDS, blocks=members)
    return dq, dA, dC


def dpfp_features_forward(library, x, nu: int):
    """DPFP-nu's features (csrc/dpfp_features_impl.h): x [..., D] contiguous -> [..., 2 D nu]."""
    D = x.shape[-1]
    rows = x.numel() // D if D else 0
    y = x.new_empty(*x.shape[:-1], 2 * D * nu)
    function = getattr(library, f"dpfp_features_forward_{SUFFIX[x.dtype]}")

    def run(r0: int, r1: int) -> None:
        scratch = x.new_empty(2 * D)                  # named: held until C returns
        function(ctypes.c_long(r1 - r0), ctypes.c_long(D), ctypes.c_long(nu),
                 *_row_pointers(x.dtype, rows, r0, x, y), *_pointers(x.dtype, scratch))

    if rows:
        _over_batch(rows, rows * 2 * D * nu * 4, run)
    return y


def dpfp_features_backward(library, x, g, nu: int):
    """dLoss/dx [..., D] of ``dpfp_features_forward`` for dLoss/dphi = g [..., 2 D nu]."""
    D = x.shape[-1]
    rows = x.numel() // D if D else 0
    dx = torch.empty_like(x)
    function = getattr(library, f"dpfp_features_backward_{SUFFIX[x.dtype]}")

    def run(r0: int, r1: int) -> None:
        scratch = x.new_empty(4 * D)                  # named: held until C returns
        function(ctypes.c_long(r1 - r0), ctypes.c_long(D), ctypes.c_long(nu),
                 *_row_pointers(x.dtype, rows, r0, x, g, dx), *_pointers(x.dtype, scratch))

    if rows:
        _over_batch(rows, rows * 2 * D * nu * 8, run)
    return dx


def dpfp_normalised_forward(library, x, nu: int, eps: float):
    """DPFP-nu's features sum-normalised, phi(x) / (sum_i phi(x)_i + eps), in one pass
    (csrc/dpfp_features_impl.h): x [..., D] contiguous -> (y [..., 2 D nu], s [...] the sums
    + eps, for the backward); the floats of ``dpfp_features_forward`` then
    ``sum_normalise_forward``."""
    D = x.shape[-1]
    y, s = x.new_empty(*x.shape[:-1], 2 * D * nu), x.new_empty(x.shape[:-1])
    rows = s.numel()
    real = ctypes.c_float if x.dtype == torch.float32 else ctypes.c_double
    function = getattr(library, f"dpfp_normalised_forward_{SUFFIX[x.dtype]}")

    def run(r0: int, r1: int) -> None:
        scratch = x.new_empty(2 * D)                  # named: held until C returns
        function(ctypes.c_long(r1 - r0), ctypes.c_long(D), ctypes.c_long(nu), real(eps),
                 *_row_pointers(x.dtype, rows, r0, x, y, s), *_pointers(x.dtype, scratch))

    if rows and D:
        _over_batch(rows, rows * 2 * D * nu * 6, run)
    elif rows:
        s.fill_(eps)                                  # the empty rows' sums
    return y, s


def dpfp_normalised_backward(library, x, y, s, g, nu: int):
    """dLoss/dx [..., D] of ``dpfp_normalised_forward`` from x, its y and s, for dLoss/dy = g:
    the floats of ``sum_normalise_backward`` then ``dpfp_features_backward``."""
    D = x.shape[-1]
    rows = x.numel() // D if D else 0
    dx = torch.empty_like(x)
    function = getattr(library, f"dpfp_normalised_backward_{SUFFIX[x.dtype]}")

    def run(r0: int, r1: int) -> None:
        scratch = x.new_empty((4 + 2 * nu) * D)        # named: held until C returns
        function(ctypes.c_long(r1 - r0), ctypes.c_long(D), ctypes.c_long(nu),
                 *_row_pointers(x.dtype, rows, r0, x, y, s, g, dx), *_pointers(x.dtype, scratch))

    if rows:
        _over_batch(rows, rows * 2 * D * nu * 12, run)
    return dx


def sum_normalise_forward(library, x, eps: float):
    """x / (sum_i x_i + eps) over the last dimension (csrc/sum_normalise_impl.h): x [..., D]
    contiguous -> (y [..., D], s [...] the sums + eps, for the backward)."""
    D = x.shape[-1]
    y, s = torch.empty_like(x), x.new_empty(x.shape[:-1])
    rows = s.numel()
    real = ctypes.c_float if x.dtype == torch.float32 else ctypes.c_double
    function = getattr(library, f"sum_normalise_forward_{SUFFIX[x.dtype]}")

    def run(r0: int, r1: int) -> None:
        function(ctypes.c_long(r1 - r0), ctypes.c_long(D), real(eps),
                 *_row_pointers(x.dtype, rows, r0, x, y, s))

    if rows and D:
        _over_batch(rows, rows * D * 2, run)
    elif rows:
        s.fill_(eps)                                  # the empty rows' sums
    return y, s


def sum_normalise_backward(library, y, s, g):
    """dLoss/dx [..., D] of ``sum_normalise_forward`` from its y and s, for dLoss/dy = g."""
    D = y.shape[-1]
    rows = s.numel()
    dx = torch.empty_like(y)
    function = getattr(library, f"sum_normalise_backward_{SUFFIX[y.dtype]}")

    def run(r0: int, r1: int) -> None:
        function(ctypes.c_long(r1 - r0), ctypes.c_long(D),
                 *_row_pointers(y.dtype, rows, r0, y, s, g, dx))

    if rows and D:
        _over_batch(rows, rows * D * 4, run)
    return dx


def favor_kernel_forward(library, s, c, floor: float):
    """FAVOR+'s kernel terms (csrc/favor_kernel_impl.h): s [..., m] (contiguous) becomes
    exp(max(s - c, floor)) - exp(max(-s - c, floor)) in place; returns their sum over m, [...]
    (c has the shape of that sum)."""
    m = s.shape[-1]
    rows = s.numel() // m
    K = s.new_empty(s.shape[:-1])
    function = getattr(library, f"favor_kernel_forward_{SUFFIX[s.dtype]}")
    real = ctypes.c_float if s.dtype == torch.float32 else ctypes.c_double

    def run(r0: int, r1: int) -> None:
        scratch = s.new_empty(m)                      # named: held until C returns
        function(ctypes.c_long(r0), ctypes.c_long(r1), ctypes.c_long(m), real(floor),
                 *_pointers(s.dtype, s, c, K, scratch))

    _over_batch(rows, rows * m * 8, run)
    return K


def favor_projected_forward(library, A, a, C, k, p, c, floor: float):
    """FAVOR+'s kernel terms for keys as two row lookups (csrc/favor_kernel_impl.h): tables
    A [NA, m], C [NC, m], ids a, k [B, L] int64, p [B, Q, m], c [B, Q, L] (one dtype,
    contiguous) -> (K [B, Q, L], e+ - e- [B, Q, L, m]) for s = (A[a] + C[k]) + p of every
    pair. IndexError for an id outside its table."""
    B, Q, m = p.shape
    L = a.shape[1]
    K, diff = p.new_empty(B, Q, L), p.new_empty(B, Q, L, m)
    function = getattr(library, f"favor_projected_forward_{SUFFIX[p.dtype]}")
    real = ctypes.c_float if p.dtype == torch.float32 else ctypes.c_double

    def run(r0: int, r1: int) -> int:
        scratch = p.new_empty(m)                      # named: held until C returns
        return function(
            ctypes.c_long(r0), ctypes.c_long(r1), ctypes.c_long(Q), ctypes.c_long(L),
            ctypes.c_long(m), real(floor), *_pointers(p.dtype, A), ctypes.c_long(A.shape[0]),
            _ids(a), *_pointers(p.dtype, C), ctypes.c_long(C.shape[0]), _ids(k),
            *_pointers(p.dtype, p, c, diff, K, scratch))

    _over_batch_checked(B * Q * L, B * Q * L * m * 8, run, LOOKUP_IDS)
    return K, diff


def favor_projected_backward(library, g, diff, NA: int, a, NC: int, k, members: int = 1):
    """Gradients (dA [NA, m], dC [NC, m], dp [B, Q, m]) of ``favor_projected_forward``'s K for
    dLoss/dK = g [B, Q, L], from its e+ - e- (diff [B, Q, L, m]); one pass, one thread per
    member of ``members`` stacked models (as ``dpfp_projected_kernel_backward``)."""
    B, Q, L, m = diff.shape
    dA, dC, dp = diff.new_zeros(NA, m), diff.new_zeros(NC, m), diff.new_zeros(B, Q, m)
    function = getattr(library, f"favor_projected_backward_{SUFFIX[diff.dtype]}")

    def run(b0: int, b1: int) -> int:
        return function(
            ctypes.c_long(b0), ctypes.c_long(b1), ctypes.c_long(Q), ctypes.c_long(L),
            ctypes.c_long(m), *_pointers(diff.dtype, g, diff), ctypes.c_long(NA), _ids(a),
            ctypes.c_long(NC), _ids(k), *_pointers(diff.dtype, dA, dC, dp))

    _over_batch_checked(B, 6 * B * Q * L * m, run, LOOKUP_IDS, blocks=members)
    return dA, dC, dp


def _elementwise(function, n: int, tensors, *scalars) -> None:
    """function(count, *scalars, *pointers) over contiguous tensors of n values each, the values
    split over torch's threads when there are enough (elementwise: no float changes)."""
    def run(lo: int, hi: int) -> None:
        function(ctypes.c_long(hi - lo), *scalars,
                 *_row_pointers(tensors[0].dtype, n, lo, *tensors))

    _over_batch(n, 8 * n, run)


def pointwise_forward(library, kind: str, x, floor: float):
    """phi(x) for kind "elu_plus_one" or "tanh" (csrc/pointwise_impl.h); x contiguous."""
    y = torch.empty_like(x)
    real = ctypes.c_float if x.dtype == torch.float32 else ctypes.c_double
    _elementwise(getattr(library, f"{kind}_forward_{SUFFIX[x.dtype]}"), x.numel(), (x, y),
                 real(floor))
    return y


def pointwise_backward(library, kind: str, y, g):
    """dLoss/dx of ``pointwise_forward`` from its output y and dLoss/dy = g."""
    dx = torch.empty_like(y)
    _elementwise(getattr(library, f"{kind}_backward_{SUFFIX[y.dtype]}"), y.numel(), (y, g, dx))
    return dx


def pointwise_lookup_forward(library, kind: str, A, a, B, b, floor: float):
    """phi(A[a] + B[b]) for kind "elu_plus_one" or "tanh" (csrc/pointwise_impl.h): tables
    A [NA, D], B [NB, D] (one dtype, contiguous), ids a, b [R] int64 -> [R, D], the floats of
    ``gather_add_forward`` followed by ``pointwise_forward``; rows split over torch's threads
    when there are enough. IndexError for an id outside its table."""
    R, D = a.shape[0], A.shape[1]
    y = A.new_empty(R, D)
    function = getattr(library, f"{kind}_lookup_forward_{SUFFIX[A.dtype]}")
    real = ctypes.c_float if A.dtype == torch.float32 else ctypes.c_double

    def run(r0: int, r1: int) -> int:
        return function(
            ctypes.c_long(r0), ctypes.c_long(r1), ctypes.c_long(D), real(floor),
            *_pointers(A.dtype, A), ctypes.c_long(A.shape[0]), _ids(a), *_pointers(A.dtype, B),
            ctypes.c_long(B.shape[0]), _ids(b), *_pointers(A.dtype, y))

    _over_batch_checked(R, 8 * R * D, run, LOOKUP_IDS)
    return y


def pointwise_lookup_backward(library, kind: str, g, p, y, NA: int, a, NB: int, b,
                              members: int = 1):
    """Gradients (dA [NA, D], dB [NB, D]) of the scores s = p y^T (p [B, Q, D], y [B, L, D]
    from ``pointwise_lookup_forward`` with ids a, b [B, L]) for dLoss/ds = g [B, Q, L], through
    the map: for one query the floats of PairScores' key gradient, ``pointwise_backward`` and
    ``gather_add_backward``. One thread per member of ``members`` stacked models (as
    ``dpfp_projected_kernel_backward``)."""
    Bn, Q, L = g.shape
    D = y.shape[-1]
    dA, dB = y.new_zeros(NA, D), y.new_zeros(NB, D)
    function = getattr(library, f"{kind}_lookup_backward_{SUFFIX[y.dtype]}")

    def run(b0: int, b1: int) -> int:
        scratch = y.new_empty(D)                      # named: held until C returns
        return function(
            ctypes.c_long(b0), ctypes.c_long(b1), ctypes.c_long(Q), ctypes.c_long(L),
            ctypes.c_long(D), *_pointers(y.dtype, g, p, y), ctypes.c_long(NA), _ids(a),
            ctypes.c_long(NB), _ids(b), *_pointers(y.dtype, dA, dB, scratch))

    _over_batch_checked(Bn, 4 * Bn * L * D * (Q + 1), run, LOOKUP_IDS, blocks=members)
    return dA, dB


def pointwise_lookup_features_backward(library, kind: str, y, g, NA: int, a, NB: int, b,
                                       members: int = 1):
    """Gradients (dA [NA, D], dB [NB, D]) of ``pointwise_lookup_forward``'s y [R, D] itself for
    dLoss/dy = g [R, D]: the floats of ``pointwise_backward`` followed by
    ``gather_add_backward``, without the [R, D] gradient between them. One thread per member
    of ``members`` stacked models (as ``dpfp_projected_kernel_backward``)."""
    R, D = y.shape
    dA, dB = y.new_zeros(NA, D), y.new_zeros(NB, D)
    function = getattr(library, f"{kind}_lookup_features_backward_{SUFFIX[y.dtype]}")

    def run(r0: int, r1: int) -> int:
        scratch = y.new_empty(D)                      # named: held until C returns
        return function(
            ctypes.c_long(r0), ctypes.c_long(r1), ctypes.c_long(D), *_pointers(y.dtype, y, g),
            ctypes.c_long(NA), _ids(a), ctypes.c_long(NB), _ids(b),
            *_pointers(y.dtype, dA, dB, scratch))

    _over_batch_checked(R, 4 * R * D, run, LOOKUP_IDS, blocks=members)
    return dA, dB


def _ids(ids: torch.Tensor) -> ctypes.c_void_p:
    if ids.dtype != torch.int64 or ids.device.type != "cpu" or not ids.is_contiguous():
        raise ValueError(f"the native steps take contiguous CPU int64 ids, got {ids.dtype} "
                         f"on {ids.device}")
    return ctypes.c_void_p(ids.data_ptr())


def gather_add_forward(library, A, a, B, b):
    """A[a] + B[b]: tables A [NA, D], B [NB, D] (one dtype, contiguous), ids a, b [R] int64
    -> [R, D] (csrc/gather_add_impl.h). IndexError for an id outside its table."""
    R, D = a.shape[0], A.shape[1]
    out = A.new_empty(R, D)
    failed = getattr(library, f"gather_add_forward_{SUFFIX[A.dtype]}")(
        ctypes.c_long(R), ctypes.c_long(D), *_pointers(A.dtype, A), ctypes.c_long(A.shape[0]),
        _ids(a), *_pointers(A.dtype, B), ctypes.c_long(B.shape[0]), _ids(b),
        *_pointers(A.dtype, out))
    if failed:
        raise IndexError(LOOKUP_IDS)
    return out


def gather_add_backward(library, g, NA: int, a, NB: int, b, members: int = 1):
    """Gradients (dA [NA, D], dB [NB, D]) of ``gather_add_forward`` for dLoss/dout = g [R, D].
    One thread per member of ``members`` stacked models, each R / members rows reading its own
    rows of the tables (as ``dpfp_projected_kernel_backward``)."""
    R, D = g.shape
    dA, dB = g.new_zeros(NA, D), g.new_zeros(NB, D)
    function = getattr(library, f"gather_add_backward_{SUFFIX[g.dtype]}")

    def run(r0: int, r1: int) -> int:
        return function(
            ctypes.c_long(r0), ctypes.c_long(r1), ctypes.c_long(D), *_pointers(g.dtype, g),
            ctypes.c_long(NA), _ids(a), ctypes.c_long(NB), _ids(b), *_pointers(g.dtype, dA, dB))

    _over_batch_checked(R, 4 * R * D, run, LOOKUP_IDS, blocks=members)
    return dA, dB
