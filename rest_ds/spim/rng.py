"""Randomness under SPIM: one run, whatever the grid (docs/design.md section 3).

Two mechanisms, both here:

* **A stream shared by the sp group.** While a model prepared by
  :func:`install` (``parallelize`` calls it) runs forward, torch's *default*
  generator holds a state seeded identically on every sp rank (differently
  across dp replicas); the user's own state is put back when the forward ends
  (also when it raises). ``torch.utils.checkpoint`` stashes and restores the
  default generator for its recompute, so it replays the same draws in
  backward. Random ops that stay native (``torch.rand(size)``, ``randperm``,
  ...) draw the same numbers on every rank from it.

* **Counter-based, grid-invariant values.** Every element-wise random op
  (dropout and its feature/alpha variants, ``rrelu``, ``bernoulli(_)``,
  ``uniform_``, ``normal_``, ``rand_like``/``randn_like``/``randint_like``)
  draws ONE 62-bit seed from the default (shared) stream and computes each
  element's value as a function of ``(seed, the element's global linear
  index)``: splitmix64 of ``mix(seed) + (index + 1) * golden``, in int64 torch
  ops on the tile only (CPU and CUDA alike), a cache-sized chunk at a time (the
  index tensor itself is never built: :func:`_bit_chunks`). A tile therefore holds exactly the
  values the same op would give on the whole scene in one process, and masks,
  outputs and gradients are the same for every grid, 1x1 included. Channel
  masks (``dropout2d``, ``feature_alpha_dropout``) index the ``(sample,
  channel)`` mask itself: one draw per (sample, channel), identical on all ranks.

For one process to draw the same values as the sharded run, the *plain* tensors
of a model must take the same route, so :func:`install` also makes the forward
run under :class:`GridInvariantRandom`, a ``TorchFunctionMode`` that sends these
ops, plain or sharded, through :func:`random_op`. A plain, unparallelized model
gets the identical run with ``install(model, seed)`` (what ``verify`` does for
its reference). The mode is also entered by every submodule's forward when it
is not active, which covers activation-checkpoint recomputes (they run in
backward, outside the model's forward): random ops on plain tensors inside a
checkpointed function replay exactly when they run inside a submodule (as
``nn.Dropout`` and timm's ``DropPath`` do); on SpatialTensors they always do.
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .errors import SPIMError
from .tensor import SpatialTensor  # (tensor.py does not import this module)

_RANDOM_NAMES = (
    "bernoulli bernoulli_ uniform_ normal_ random_ exponential_ cauchy_ geometric_ log_normal_ rand randn randint "
    "randperm rand_like randn_like randint_like normal poisson multinomial dropout dropout_ alpha_dropout "
    "alpha_dropout_ feature_dropout feature_dropout_ feature_alpha_dropout feature_alpha_dropout_ dropout1d "
    "dropout2d dropout3d rrelu rrelu_"
).split()
RANDOM_FUNCS = {f for n in _RANDOM_NAMES for o in (torch, torch.Tensor, F) if callable(f := getattr(o, n, None))}


def _devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


class SharedRNG:
    """A generator state (CPU, and the current CUDA device's) that becomes the
    default generator's state inside :meth:`active`."""

    def __init__(self, seed: int):
        with torch.random.fork_rng(devices=_devices()):
            torch.manual_seed(seed)
            self._cpu = torch.get_rng_state()
            self._cuda = torch.cuda.get_rng_state() if _devices() else None
        self._saved: list = []

    def state(self) -> tuple:
        """The stream's current position (CPU state, CUDA state or None)."""
        return self._cpu, self._cuda

    def set_state(self, cpu: torch.Tensor, cuda: torch.Tensor | None = None) -> None:
        """Move the stream to a position :meth:`state` returned (a checkpoint's). The
        CUDA state is kept when ``cuda`` is None (a checkpoint written on CPU)."""
        self._cpu = cpu.clone()
        if cuda is not None and self._cuda is not None:
            self._cuda = cuda.clone()

    def enter(self, at: tuple | None = None) -> None:
        """Make the stream the default generator, at its current position or at
        ``at`` (a :meth:`state`; a replay, which leaves the stream's position as it is)."""
        self._saved.append((torch.get_rng_state(), torch.cuda.get_rng_state() if self._cuda is not None else None,
                            at is None))
        cpu, cuda = at if at is not None else (self._cpu, self._cuda)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)

    def exit(self) -> None:
        if not self._saved:
            return
        cpu, cuda, advance = self._saved.pop()
        if advance:
            self._cpu = torch.get_rng_state()
            if self._cuda is not None:
                self._cuda = torch.cuda.get_rng_state()
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)

    @contextlib.contextmanager
    def active(self):
        self.enter()
        try:
            yield self
        finally:
            self.exit()


# --- the counter-based generator ---------------------------------------------------
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SIGN = -(1 << 63)  # int64 with only the sign bit set
# Elements per chunk of the counter-based draw. The ~14 int64 passes of the hash
# run over one chunk and its scratch buffer (2 x 1 MiB) while they stay in cache,
# instead of streaming full-size int64 temporaries through memory; smaller chunks
# pay more per-op overhead (on a 1 MiB-L2 / 32 MiB-L3 CPU, one thread, 2**17 was
# the best of 2**13..2**20; benchmarks/dropout_rng.py). On a GPU (not tuned) the
# chunk bounds the scratch memory (2 x 16 MiB, L2-sized) and the launches.
_CHUNK = {"cpu": 1 << 17, "cuda": 1 << 21}


def _s64(v: int) -> int:
    """``v mod 2**64`` as a signed int64 (torch's int64 arithmetic wraps the same way)."""
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


def mix64(z: int) -> int:
    """splitmix64's finaliser on a Python int (the reference for :func:`random_bits`)."""
    z &= _M64
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def _lsr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix_(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, in place on int64 ``z`` (``t``: scratch of its shape)."""
    for shift, mult in ((30, _C1), (27, _C2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=t)
        z ^= t.bitwise_and_((1 << (64 - shift)) - 1)  # logical shift: torch's >> is arithmetic
        if mult is not None:
            z *= _s64(mult)
    return z


def random_bits(seed: int, index: torch.Tensor) -> torch.Tensor:
    """64 random bits (as int64) per element: ``mix64(mix64(seed) + (index + 1) * golden)``,
    a function of the seed and each element's counter ``index`` only."""
    z = index * _s64(_GOLDEN)  # a fresh tensor; the rest is in place, one scratch buffer
    z += _s64(mix64(seed) + _GOLDEN)
    return _mix_(z, torch.empty_like(z))


def _bit_chunks(seed: int, vecs: list[torch.Tensor], device: torch.device, scale: int = 1, offset: int = 0,
                out: torch.Tensor | None = None):
    """:func:`random_bits` of the counters ``scale * index + offset``, where ``index``
    is the broadcast sum of the 1-D ``vecs`` (one per dim, row-major; see
    :func:`_index_vectors`), a chunk at a time: yields ``(lo, hi, bits)``, the
    flat elements ``lo:hi`` as a 1-D int64 view. ``out`` (flat int64 of the full
    size): computed in it; otherwise in one scratch buffer that the next chunk
    overwrites. The full index tensor is never built: the counters' affine map
    is folded into the small per-dim vectors, and a chunk is one broadcast add."""
    device = torch.device(device)
    chunk = _CHUNK.get(device.type, _CHUNK["cuda"])
    w = [v * _s64(_GOLDEN * scale) for v in vecs] or [torch.zeros(1, dtype=torch.int64, device=device)]
    w[-1] = w[-1] + _s64(mix64(seed) + (offset + 1) * _GOLDEN)
    # inner: the trailing dims that fit in a chunk (at least the last); outer: the rest, flattened
    s, inner = len(w) - 1, w[-1]
    while s > 0 and inner.numel() * w[s - 1].numel() <= chunk:
        s -= 1
        inner = (w[s][:, None] + inner[None, :]).reshape(-1)
    outer = torch.zeros(1, dtype=torch.int64, device=device)
    for v in w[:s]:
        outer = (outer[:, None] + v[None, :]).reshape(-1)
    n_out, n_in = outer.numel(), inner.numel()
    if n_out * n_in == 0:
        return
    per, step = (max(1, chunk // n_in), n_in) if n_in <= chunk else (1, chunk)
    size = min(per * step, n_out * n_in)
    tmp = torch.empty(size, dtype=torch.int64, device=device)
    buf = torch.empty(size, dtype=torch.int64, device=device) if out is None else None
    for o in range(0, n_out, per):
        m = min(per, n_out - o)
        for i in range(0, n_in, step):
            j = min(i + step, n_in)
            lo = o * n_in + i
            hi = lo + m * (j - i)  # contiguous: m == 1 whenever j - i < n_in
            z = (out[lo:hi] if out is not None else buf[:hi - lo]).view(m, j - i)
            torch.add(outer[o:o + m, None], inner[None, i:j], out=z)
            yield lo, hi, _mix_(z, tmp[:hi - lo].view(m, j - i)).view(-1)


def _bits(seed: int, x: torch.Tensor, kept: int | None = None, scale: int = 1, offset: int = 0,
          device=None) -> torch.Tensor:
    """``random_bits(seed, scale * element_index(x, kept) + offset)``, computed
    chunk by chunk into its int64 result (on ``device``, default ``x``'s)."""
    device = device or _local(x).device
    vecs, shape = _index_vectors(x, kept, device)
    out = torch.empty(shape, dtype=torch.int64, device=device)
    for _ in _bit_chunks(seed, vecs, device, scale, offset, out.view(-1)):
        pass
    return out


def _keep_mask(seed: int, x: torch.Tensor, kept: int | None, p: float, dtype: torch.dtype,
               divisor: float | None) -> torch.Tensor:
    """Dropout's keep mask on the index shape of ``(x, kept)``, in ``dtype``: 1 where
    the element's 53 top random bits are ``>= ceil(p * 2**53)`` (P = 1 - p), else 0;
    then divided by ``divisor`` when given. The same values as
    ``(_u53_of(bits) >= T).to(dtype) / divisor``, but compared on all 64 bits
    (``bits >= T * 2**11`` unsigned, i.e. signed after flipping both sign bits)
    inside each chunk: no full-size int64 or float temporaries."""
    device = _local(x).device
    vecs, shape = _index_vectors(x, kept)
    mask = torch.empty(shape, dtype=dtype, device=device)
    flat = mask.view(-1)
    threshold = _s64((math.ceil(p * 2.0 ** 53) << 11) ^ (1 << 63))
    for lo, hi, z in _bit_chunks(seed, vecs, device):
        z ^= _SIGN
        m = flat[lo:hi]
        torch.ge(z, threshold, out=m)
        if divisor is not None:
            m.div_(divisor)
    return mask


def _u53_of(z: torch.Tensor) -> torch.Tensor:
    """The top 53 of 64 random bits (int64 ``z``, consumed), as a non-negative int64."""
    return z.bitwise_right_shift_(11).bitwise_and_((1 << 53) - 1)


def _uniform_of(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uniform in [0, 1) from random bits ``z``: the top ``mantissa + 1`` bits, exact
    in ``dtype`` (never 1.0)."""
    bits = min(53, round(-math.log2(torch.finfo(dtype).eps)) + 1)
    work = torch.float32 if bits <= 24 else torch.float64
    return (_lsr(z, 64 - bits).to(work) * 2.0 ** -bits).to(dtype)


def _normal(seed: int, x: torch.Tensor, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Standard normal (Box-Muller in float64) from counters ``2 i`` and ``2 i + 1``."""
    u1 = (_u53_of(_bits(seed, x, scale=2, device=device)) + 1).double() * 2.0 ** -53  # (0, 1]
    u2 = _u53_of(_bits(seed, x, scale=2, offset=1, device=device)).double() * 2.0 ** -53
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)).to(dtype)


# --- global element indices -----------------------------------------------------------
def _coords(x: torch.Tensor, d: int, n: int, device) -> torch.Tensor:
    """Global coordinates along dim ``d`` of the ``n`` local entries of ``x``'s tile."""
    from .tensor import SpatialTensor

    ar = torch.arange(n, dtype=torch.int64, device=device)
    if not isinstance(x, SpatialTensor):
        return ar
    spec = x._spec
    dims = [k % x.dim() for k in spec.dims]
    if d not in dims:
        return ar
    (r0, r1), (c0, c1) = spec.row_range, spec.col_range
    if not spec.is_tokens:
        return ar + (r0 if d == dims[0] else c0)
    # token layout: prefix tokens, then (lead, H, W, trail) row-major
    H, W = spec.global_hw
    P = spec.prefix

    def a(m, k):
        return torch.arange(m, dtype=torch.int64, device=device).view([-1 if j == k else 1 for j in range(4)])

    g = P + ((a(spec.lead, 0) * H + a(r1 - r0, 1) + r0) * W + a(c1 - c0, 2) + c0) * spec.trail + a(spec.trail, 3)
    out = torch.cat([ar[:P], g.reshape(-1)])
    if out.numel() != n:
        raise SPIMError(f"internal: token tile of {n} entries does not match its layout ({out.numel()})")
    return out


def _index_vectors(x: torch.Tensor, kept: int | None = None, device=None) -> tuple[list[torch.Tensor], list[int]]:
    """The global row-major linear index of ``x``'s tile, separated by dim: for each
    of the first ``kept`` dims (all by default), the 1-D int64 ``global coordinate
    * global stride`` of its local entries (their broadcast sum is the index);
    and the index's shape (local sizes, 1 for the dims not indexed)."""
    loc = _local(x)
    device = device or loc.device
    gshape, lshape = list(x.shape), list(loc.shape)
    k = len(gshape) if kept is None else kept
    vecs = []
    stride = 1
    for d in reversed(range(k)):
        vecs.append(_coords(x, d, lshape[d], device) * stride)
        stride *= gshape[d]
    return vecs[::-1], [lshape[j] if j < k else 1 for j in range(len(lshape))]


def element_index(x: torch.Tensor, kept: int | None = None) -> torch.Tensor:
    """int64 row-major linear index, in ``x``'s *global* shape, of every element of
    this rank's tile (of ``x`` itself when it is a plain tensor).

    With ``kept = k`` only the first ``k`` dims are indexed (the others have size 1
    in the result): the elements of a ``(N, C, 1, ...)`` channel mask. Never
    materialises more than the tile. (The draws themselves never build it:
    :func:`_bit_chunks` works from the per-dim vectors.)"""
    vecs, shape = _index_vectors(x, kept)
    idx = torch.zeros((), dtype=torch.int64, device=_local(x).device)
    for d, v in enumerate(vecs):
        idx = idx + v.view([-1 if j == d else 1 for j in range(len(shape))])
    return idx.reshape(shape)


# --- the rules ----------------------------------------------------------------------
def draw_seed(generator: torch.Generator | None = None) -> int:
    """One 62-bit seed from ``generator`` (default: torch's default CPU generator,
    the sp group's shared stream inside a SPIM forward)."""
    dev = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=dev).item())


def _bind(args, kwargs, names, defaults):
    """Positional/keyword arguments by name (``defaults`` for the missing ones)."""
    out = dict(defaults)
    out.update(zip(names, args))
    out.update(kwargs)
    return out


def _local(t):
    from .tensor import SpatialTensor

    return t._local if isinstance(t, SpatialTensor) else t


def _finish(x, out, inplace: bool):
    """Result on ``x``'s layout: a SpatialTensor stays one; in place keeps the object."""
    from .tensor import SpatialTensor, wrap

    if inplace:
        if isinstance(x, SpatialTensor):
            x._local = out
        return x
    return wrap(out, x._spec) if isinstance(x, SpatialTensor) else out


_ALPHA = 1.7580993408473766  # SELU's alpha * lambda, as in ATen's alpha dropout


def _dropout(func, args, kwargs, feature: bool, alpha: bool, torch_api: bool):
    name = func.__name__
    inplace_name = name.endswith("_")
    names = ("input", "p", "train" if torch_api else "training", "inplace")
    default_train = not (alpha and not torch_api)  # F.alpha_dropout/feature_alpha_dropout: training=False
    a = _bind(args, kwargs, names, {"p": 0.5, names[2]: default_train, "inplace": inplace_name})
    x, p, train, inplace = a["input"], float(a["p"]), bool(a[names[2]]), bool(a["inplace"])
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    loc = _local(x)
    ndim = loc.dim()
    kept = None
    if feature:
        if name in ("dropout1d", "dropout3d"):
            ok = (2, 3) if name == "dropout1d" else (4, 5)
            if name == "dropout1d" and ndim not in ok:
                raise RuntimeError(f"dropout1d: Expected 2D or 3D input, but received a {ndim}D input")
            kept = 2 if ndim == ok[1] else 1  # unbatched input: one draw per channel
        else:
            kept = 2
        if ndim < kept:
            raise RuntimeError(f"{name}: feature dropout needs an input of at least {kept} dims, got {ndim}")
    if not train or p == 0.0 or x.numel() == 0:  # draws nothing: the shared stream stays in step
        return x  # as ATen: the input itself
    if p == 1.0:
        zero = torch.zeros((), dtype=loc.dtype, device=loc.device)
        return _finish(x, loc.mul_(zero) if inplace else loc * zero, inplace)
    seed = draw_seed()
    if alpha:
        noise = _keep_mask(seed, x, kept, p, loc.dtype, None)  # P(keep) = 1 - p
        s = 1.0 / math.sqrt((_ALPHA * _ALPHA * p + 1) * (1 - p))
        b = (noise - 1) * (_ALPHA * s) + _ALPHA * s * p
        noise = noise * s
        out = loc.mul_(noise).add_(b) if inplace else loc * noise + b
    else:
        noise = _keep_mask(seed, x, kept, p, loc.dtype, 1 - p)
        out = loc.mul_(noise) if inplace else loc * noise
    return _finish(x, out, inplace)


def _rrelu(func, args, kwargs):
    inplace_name = func.__name__.endswith("_")
    a = _bind(args, kwargs, ("input", "lower", "upper", "training", "inplace"),
              {"lower": 1.0 / 8, "upper": 1.0 / 3, "training": False, "inplace": inplace_name})
    x, lo, hi, inplace = a["input"], float(a["lower"]), float(a["upper"]), bool(a["inplace"])
    loc = _local(x)
    if not a["training"]:  # deterministic: slope (lower + upper) / 2
        return _finish(x, F.leaky_relu(loc, (lo + hi) / 2, inplace=inplace), inplace)
    slope = lo + (hi - lo) * _uniform_of(_bits(draw_seed(a.get("generator")), x), loc.dtype)
    noise = torch.where(loc >= 0, torch.ones_like(slope), slope)
    return _finish(x, loc.mul_(noise) if inplace else loc * noise, inplace)


def _fill(x, values):
    """``x`` filled with ``values`` in place (autograd as for torch's own in-place fills)."""
    loc = _local(x)
    return _finish(x, loc.copy_(values), True)


def _prob(p, x):
    """A probability operand on ``x``'s tile (a SpatialTensor's tile, a plain
    tensor of the global extent sliced to it, a number as is)."""
    from .tensor import SpatialTensor

    if isinstance(p, SpatialTensor):
        return p._local
    if isinstance(p, torch.Tensor) and p.dim() > 0 and isinstance(x, SpatialTensor):
        from .ops.pointwise import align_plain

        return align_plain(p, x.dim(), x._spec, "bernoulli")
    return p


def _bernoulli(func, args, kwargs):
    x = args[0]
    gen = kwargs.get("generator")
    if kwargs.get("out") is not None:
        raise SPIMError("bernoulli(out=...) has no grid-invariant rule; assign the result instead")
    loc = _local(x)
    inplace = func.__name__ == "bernoulli_"
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5 if inplace else None)
    probs = loc if p is None else _prob(p, x)
    u = _u53_of(_bits(draw_seed(gen), x)).double() * 2.0 ** -53
    probs = probs.double() if isinstance(probs, torch.Tensor) else float(probs)
    draws = (u < probs).to(loc.dtype)
    return _fill(x, draws) if inplace else _finish(x, draws, False)


def _uniform_(func, args, kwargs):
    a = _bind(args, kwargs, ("self", "from", "to"), {"from": 0.0, "to": 1.0})
    x = a["self"]
    u = _uniform_of(_bits(draw_seed(a.get("generator")), x), _local(x).dtype)
    return _fill(x, u * (a["to"] - a["from"]) + a["from"])


def _normal_(func, args, kwargs):
    a = _bind(args, kwargs, ("self", "mean", "std"), {"mean": 0.0, "std": 1.0})
    x = a["self"]
    z = _normal(draw_seed(a.get("generator")), x, _local(x).dtype)
    return _fill(x, z * a["std"] + a["mean"])


def _like(func, args, kwargs):
    x = args[0]
    kw = dict(kwargs)
    gen = kw.pop("generator", None)
    name = func.__name__
    if name == "randint_like":
        ints = list(args[1:]) + [kw.pop(k) for k in ("low", "high") if k in kw]
        low, high = (0, ints[0]) if len(ints) == 1 else (ints[0], ints[1])
    loc = _local(x)
    dtype = kw.get("dtype") or loc.dtype
    device = kw.get("device") or loc.device
    seed = draw_seed(gen)
    if name == "rand_like":
        out = _uniform_of(_bits(seed, x, device=device), dtype)
    elif name == "randn_like":
        out = _normal(seed, x, dtype, device)
    else:  # low + floor(u * (high - low)), u with 53 bits
        u = _u53_of(_bits(seed, x, device=device)).double() * 2.0 ** -53
        out = (low + torch.floor(u * (high - low))).clamp_(max=high - 1).to(dtype)
    if kw.get("requires_grad"):
        out.requires_grad_(True)
    return _finish(x, out, False)


def _rules() -> dict:
    r = {}
    for name, feature, alpha in (("dropout", False, False), ("alpha_dropout", False, True),
                                 ("feature_dropout", True, False), ("feature_alpha_dropout", True, True),
                                 ("dropout1d", True, False), ("dropout2d", True, False),
                                 ("dropout3d", True, False)):
        for owner, torch_api in ((F, False), (torch, True)):
            for n in (name, name + "_"):
                f = getattr(owner, n, None)
                if callable(f) and f not in r:
                    r[f] = (lambda fe, al, ta: lambda func, args, kwargs: _dropout(func, args, kwargs, fe, al, ta))(
                        feature, alpha, torch_api)
    for f in (F.rrelu, F.rrelu_, torch.rrelu, torch.rrelu_):
        r[f] = _rrelu
    for f in (torch.bernoulli, torch.Tensor.bernoulli, torch.Tensor.bernoulli_):
        r[f] = _bernoulli
    r[torch.Tensor.uniform_] = _uniform_
    r[torch.Tensor.normal_] = _normal_
    for f in (torch.rand_like, torch.randn_like, torch.randint_like):
        r[f] = _like
    return r


_RULES = _rules()
GRID_INVARIANT_FUNCS = frozenset(_RULES)


def random_op(func, args, kwargs):
    """A random torch op on a plain tensor or a SpatialTensor: grid-invariant values
    (module docstring) where SPIM has a rule; any other random op on a
    SpatialTensor is refused by name (its values would depend on the tiling)."""
    rule = _RULES.get(func)
    if rule is None:
        from . import context
        from .tensor import op_name

        raise context.unsupported(op_name(func), "random op without a grid-invariant rule on a sharded tensor "
                                                 "(its values would depend on the tiling)")
    return rule(func, args, kwargs)


# --- the mode and the hooks -------------------------------------------------------------
_tls = threading.local()


# Other rules for plain-tensor ops inside a SPIM forward (register_plain_route): they
# ride on this mode instead of stacking a TorchFunctionMode of their own, because every
# torch call of the forward passes through each entered mode (a few us per call and mode).
_ROUTES: dict = {}


def register_plain_route(func, route) -> None:
    """Let :class:`GridInvariantRandom` offer ``func`` (not a random op) to
    ``route(func, types, args, kwargs)`` first: its result is returned, or the call
    runs unchanged when it returns None. ``parallelize`` always installs this mode,
    so a route sees every call of ``func`` in a parallelized forward (and in its
    checkpoint recomputes); it must check for itself that it applies (the current
    run, ``context.current()``) and do nothing otherwise."""
    if func in _RULES or _ROUTES.get(func, route) is not route:
        raise SPIMError(f"internal: two plain-tensor rules for {getattr(func, '__name__', func)}")
    _ROUTES[func] = route


class GridInvariantRandom(TorchFunctionMode):
    """Routes the element-wise random ops of plain tensors (and SpatialTensors)
    through :func:`random_op`, and the ops of :func:`register_plain_route` to their
    routes; every other op runs as it would without the mode."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is not None:
            return rule(func, args, kwargs)
        route = _ROUTES.get(func)
        if route is not None:
            out = route(func, types, args, kwargs)
            if out is not None:
                return out
        if (len(types) == 1 and types[0] is SpatialTensor and torch._C._len_torch_function_stack() == 0
                and torch._C._is_torch_function_enabled()):
            # what torch does next (no mode left, one overloaded type, subclasses not disabled):
            # SpatialTensor's rule, called here without a second round of dispatch (for the
            # ops of a Python function such as F.layer_norm, a second handle_torch_function)
            return SpatialTensor.__torch_function__(func, types, args, kwargs)
        return func(*args, **kwargs)


def mode_active() -> bool:
    return getattr(_tls, "depth", 0) > 0


@contextlib.contextmanager
def grid_invariant():
    """Plain-tensor random ops inside draw grid-invariant values (nests freely)."""
    mode = GridInvariantRandom()
    _tls.depth = getattr(_tls, "depth", 0) + 1
    try:
        with mode:
            yield
    finally:
        _tls.depth -= 1


def install_rng(model: torch.nn.Module, mesh, seed: int | None = None, *, submodule_hooks: bool = True) -> list:
    """SPIM's randomness for ``model`` on ``mesh`` (a :class:`SpatialMesh`): every
    forward is one grid-invariant run (:func:`install`) seeded with ``seed``
    (default: sp rank 0's ``torch.initial_seed()``) plus the dp index, so all sp
    ranks of a replica share the stream and replicas differ. ``parallelize``
    calls it; call it on a model that is not parallelized (sp = 1) to draw the
    same values as the same replica on any grid. Returns the hook handles
    (``submodule_hooks``: see :func:`install`)."""
    if seed is None:
        box = [torch.initial_seed() % (2 ** 62)]
        if mesh.sp > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(box, src=mesh.sp_ranks[0], group=mesh.sp_group)
        seed = box[0]
    return install(model, seed + 1_000_003 * mesh.dp_index, submodule_hooks=submodule_hooks)


def install(model: torch.nn.Module, seed: int, *, submodule_hooks: bool = True) -> list:
    """Make every forward of ``model`` one grid-invariant run: the default generator
    is ``SharedRNG(seed)``'s during the forward, and element-wise random ops draw
    counter-based values (also in checkpoint recomputes, through the submodules'
    forwards). Returns the hook handles. ``parallelize`` calls it on every sp rank
    with the same seed; a plain model given the same seed draws the same values.

    ``submodule_hooks=False``: only the root's hooks are registered, and the caller
    must call ``model._spim_rng_sub`` = ``(pre(), post())`` around every
    submodule's forward, post also when it raises (``parallelize`` does, from its
    own per-submodule hooks: one hook pair per module instead of two)."""
    rng = SharedRNG(seed)
    model._spim_rng = rng
    tls = threading.local()  # a stack of entered modes per thread (CUDA backward recomputes on its own)

    def stack() -> list:
        try:
            return tls.stack
        except AttributeError:
            tls.stack = []
            return tls.stack

    def enter():
        ctx = grid_invariant()
        ctx.__enter__()
        stack().append(ctx)

    # The caller's generator state at the start of recent forwards -> the stream's
    # position then. Checkpointing the whole model recomputes its forward in backward
    # with the caller's state of that forward put back; the stream must then replay
    # from where that forward started, not go on.
    starts: dict[bytes, tuple] = {}

    def root_pre(mod, args):
        key = torch.get_rng_state().numpy().tobytes()
        if torch._C._current_graph_task_id() != -1:  # inside backward: a checkpoint recompute
            if key not in starts:
                raise SPIMError("a recompute of the whole model in backward matches no forward's generator state "
                                "(activation checkpointing with preserve_rng_state=False?): its random draws "
                                "cannot be replayed")
            rng.enter(at=starts[key])
        else:
            starts.pop(key, None)
            starts[key] = rng.state()
            while len(starts) > 16:
                starts.pop(next(iter(starts)))
            rng.enter()
        enter()

    def leave():
        if stack():
            ctx = stack().pop()
            if ctx is not None:
                ctx.__exit__(None, None, None)

    def root_post(mod, args, out):
        leave()
        rng.exit()

    def sub_enter():
        if mode_active():
            stack().append(None)
        else:
            enter()

    def sub_pre(mod, args):
        sub_enter()

    def sub_post(mod, args, out):
        leave()

    handles = [model.register_forward_pre_hook(root_pre),
               model.register_forward_hook(root_post, always_call=True)]
    if not submodule_hooks:
        model._spim_rng_sub = (sub_enter, leave)
        return handles
    for name, m in model.named_modules():
        if name:
            handles += [m.register_forward_pre_hook(sub_pre), m.register_forward_hook(sub_post, always_call=True)]
    return handles


def rng_state(model: torch.nn.Module) -> dict | None:
    """The position of ``model``'s grid-invariant stream (installed by :func:`install`,
    which ``parallelize`` calls): ``{"cpu": uint8 tensor, "cuda": uint8 tensor or None}``,
    the same on every sp rank of a dp replica; None for a model without one. Save it in
    a checkpoint with the model and give it back with :func:`set_rng_state` to resume
    the same random draws (dropout masks, DropPath) on any grid."""
    rng = getattr(model, "_spim_rng", None)
    if rng is None:
        return None
    cpu, cuda = rng.state()
    return {"cpu": cpu.clone(), "cuda": cuda.clone() if cuda is not None else None}


def set_rng_state(model: torch.nn.Module, state: dict | torch.Tensor | None) -> None:
    """Move ``model``'s grid-invariant stream to ``state`` (from :func:`rng_state`; a
    bare CPU state tensor is accepted too). ``None`` leaves it as it is. Raises
    :class:`SPIMError` when ``model`` has no stream or ``state`` is not one."""
    if state is None:
        return
    rng = getattr(model, "_spim_rng", None)
    if rng is None:
        raise SPIMError("set_rng_state: the model has no SPIM random stream (parallelize it, or "
                        "rest_ds.spim.rng.install(model, seed), first)")
    if isinstance(state, torch.Tensor):
        state = {"cpu": state, "cuda": None}
    cpu = state.get("cpu") if isinstance(state, dict) else None
    if not isinstance(cpu, torch.Tensor) or cpu.dtype != torch.uint8 or cpu.dim() != 1:
        raise SPIMError(f"set_rng_state: expected the dict rng_state() returns, got {type(state).__name__}")
    rng.set_state(cpu, state.get("cuda"))
