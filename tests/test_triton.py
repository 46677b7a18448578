"""The "triton" backend against the float64 reference (SPEC section 5).

Without a GPU (CI) the kernels run on CPU tensors through the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports them); sizes are small
but odd.  GPU-only checks live in tests/test_triton_gpu.py, ahead-of-time compilation in
tests/test_triton_aot.py.
"""

import math

import pytest
import torch

import fusedgru
from fusedgru import backends, reference, testing
from fusedgru.kernels import gru
from fusedgru.kernels.backend import backend as triton_backend
# programs of a launch in threads (the persistent grid barrier with several programs)
from test_triton_concurrent import concurrent_programs  # noqa: F401  (a fixture)

pytestmark = pytest.mark.skipif(
    triton_backend.unavailable_reason() is not None,
    reason=f"triton backend unavailable: {triton_backend.unavailable_reason()}",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (T, B, I, H): H in {1, 3, 17} and I != H; B in {1, 3, 5}; T in {1, 2, 7}.
SIZES = [(1, 1, 2, 1), (7, 5, 4, 1), (2, 3, 5, 3), (7, 1, 3, 17), (2, 5, 9, 17), (1, 3, 17, 5)]

# Small blocks so the step kernels use several column programs and reduction chunks
# (H = 17 -> 2 column blocks, 2 K chunks) and B = 17 -> 2 row blocks.
SMALL_STEP = gru.Config("step", block_b=16, block_h=16, block_k=16, num_warps=4)
# The persistent strategy under the interpreter: programs run one after another there, so a
# grid barrier can only be met by a grid of ONE program (B <= 32, H <= 32); it still runs
# every later step in one launch through the barrier, and H > 16 takes 2 K chunks.
ONE_PROGRAM_PERSISTENT = gru.Config("persistent", block_b=32, block_h=32, block_k=16,
                                    num_warps=4)
CONFIGS = {"resident": gru.Config("resident", 16, 32), "step": SMALL_STEP,
           "persistent": ONE_PROGRAM_PERSISTENT}


def _assert_ok(report):
    assert report.ok, report.failures


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
@pytest.mark.parametrize("with_h0,bias", [(True, True), (False, False), (True, False),
                                          (False, True)])
@pytest.mark.parametrize("T,B,I,H", SIZES)
def test_resident_vs_reference(T, B, I, H, with_h0, bias, reset_after, gen):
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, with_h0=with_h0,
                                   bias=bias, generator=gen)
    assert gru.choose_config(B, H, torch.float32).strategy == "resident"
    _assert_ok(testing.check_layer("triton", case, device=DEVICE, dtype=torch.float32))


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
@pytest.mark.parametrize("T,B,I,H,with_h0,bias", [
    (7, 3, 5, 17, True, True),
    (2, 17, 4, 17, False, True),
    (1, 1, 3, 33, True, False),
    (2, 5, 9, 3, False, False),
])
def test_step_vs_reference(T, B, I, H, with_h0, bias, reset_after, gen):
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, with_h0=with_h0,
                                   bias=bias, generator=gen)
    with gru.force_config(SMALL_STEP):
        _assert_ok(testing.check_layer("triton", case, device=DEVICE, dtype=torch.float32))


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
@pytest.mark.parametrize("T,B,I,H,with_h0,bias", [
    (7, 3, 5, 17, True, True),
    (3, 32, 4, 32, False, True),
    (1, 1, 3, 19, True, False),
    (5, 5, 9, 3, False, False),
])
def test_persistent_vs_reference(T, B, I, H, with_h0, bias, reset_after, gen):
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, with_h0=with_h0,
                                   bias=bias, generator=gen)
    with gru.force_config(ONE_PROGRAM_PERSISTENT):
        _assert_ok(testing.check_layer("triton", case, device=DEVICE, dtype=torch.float32))


class _LaunchRecorder:
    """Stands in for a jitted kernel: records each launch's PERSIST flag and launch options,
    then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((kwargs["PERSIST"], kwargs.get(gru.COOPERATIVE_LAUNCH)))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("strategy", ["step", "persistent"])
def test_only_persistent_launches_are_cooperative(strategy, monkeypatch, gen):
    """The grid barrier relies on every program running at once: persistent launches ask
    the driver for a cooperative launch (all programs co-resident, whatever runs on other
    streams, or an error); the per-unit launches do not need it."""
    fwd = _LaunchRecorder(gru._fwd_split_kernel)
    bwd = _LaunchRecorder(gru._bwd_split_kernel)
    monkeypatch.setattr(gru, "_fwd_split_kernel", fwd)
    monkeypatch.setattr(gru, "_bwd_split_kernel", bwd)
    case = testing.make_layer_case(4, 3, 5, 7, reset_after=False, generator=gen)
    with gru.force_config(CONFIGS[strategy]):
        _assert_ok(testing.check_layer("triton", case, device=DEVICE, dtype=torch.float32))
    for rec in (fwd, bwd):
        assert rec.launches, "no split launch"
        assert all(coop is persist for persist, coop in rec.launches), rec.launches
        assert any(p for p, _ in rec.launches) == (strategy == "persistent"), rec.launches


def test_persistent_refuses_a_grid_that_cannot_be_coresident(monkeypatch, gen):
    """More programs than can run at once would wait at the first barrier forever: the
    launcher raises instead (the interpreter, and a GPU with fewer SMs than programs)."""
    monkeypatch.setattr(gru, "max_coresident_programs", lambda device: 1)
    case = testing.make_layer_case(3, 33, 4, 5, generator=gen)  # 2 row blocks
    x, h0, w_ih, w_hh, b_ih, b_hh = case.args(DEVICE, torch.float32)
    gi = reference._input_projection(x, w_ih, b_ih).contiguous()
    y = torch.empty(3, 33, 5, device=DEVICE)
    ws = torch.empty(3, 33, 20, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"persistent Triton launch of 2 programs.*"
                                           r"at most 1 can be co-resident"):
        gru.launch_forward(gi, h0, w_hh, b_hh, y, ws, True, ONE_PROGRAM_PERSISTENT)
    with pytest.raises(RuntimeError, match="co-resident"):
        gru.launch_backward(y, h0, w_hh, y, ws, ws[..., :15], ws[..., :15].clone(),
                            y[0].clone(), True, ONE_PROGRAM_PERSISTENT)


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
@pytest.mark.parametrize("strategy", ["resident", "step", "persistent"])
def test_every_output_element_written(strategy, reset_after, gen, poisoned_run):
    T, B, I, H = 3, 17, 4, 19  # two row blocks of 16, a partial column block
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, generator=gen)
    config = CONFIGS[strategy]
    outs = poisoned_run(case, config, DEVICE)
    for name, t in zip(("y", "ws", "dgi", "dgh", "dh0"), outs):
        assert torch.isfinite(t).all(), f"{name}: {int((~torch.isfinite(t)).sum())} unwritten"
    # The saved values and the pre-activation gradients match the reference's.
    a64 = case.args(None, torch.float64)
    y64, ws64 = reference.gru_layer_forward(*a64, case.reset_after)
    y, ws = outs[0], outs[1]
    assert testing.rel_err(y, y64) < 1e-5
    assert testing.rel_err(ws, ws64) < 1e-5


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
def test_every_strategy_agrees(reset_after, gen, poisoned_run):
    case = testing.make_layer_case(5, 3, 6, 17, reset_after=reset_after, generator=gen)
    res = poisoned_run(case, CONFIGS["resident"], DEVICE)
    for strategy in ("step", "persistent"):
        other = poisoned_run(case, CONFIGS[strategy], DEVICE)
        for a, b in zip(res, other):
            assert testing.rel_err(a, b) < 1e-5, strategy


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
@pytest.mark.parametrize("strategy", ["resident", "step", "persistent"])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "noh0"])
def test_inference_writes_y_only_and_equals_the_forward(strategy, reset_after, with_h0, gen):
    """launch_forward with ws=None (the inference op): every element of y written, equal to
    the y of the forward that keeps ws; the step kernels pass r, z through one step's
    scratch instead (T = 4 steps reuse it)."""
    T, B, I, H = 4, 17, 4, 19  # two row blocks of 16, a partial column block
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, with_h0=with_h0,
                                   generator=gen)
    config = CONFIGS[strategy]
    x, h0, w_ih, w_hh, b_ih, b_hh = case.args(DEVICE, torch.float32)
    gi = reference._input_projection(x, w_ih, b_ih).contiguous()
    b = b_hh if b_hh is not None else w_hh.new_zeros(3 * H)
    y_inf = torch.full((T, B, H), float("nan"), device=DEVICE)
    gru.launch_forward(gi, h0, w_hh, b, y_inf, None, case.reset_after, config)
    y = torch.full((T, B, H), float("nan"), device=DEVICE)
    ws = torch.full((T, B, 4 * H), float("nan"), device=DEVICE)
    gru.launch_forward(gi, h0, w_hh, b, y, ws, case.reset_after, config)
    assert torch.isfinite(y_inf).all()
    assert torch.equal(y_inf, y)


def test_module_takes_the_inference_op_without_grad(gen):
    f = fusedgru.FusedGRU(3, 5, backend="triton", device=DEVICE)
    x = torch.randn(4, 2, 3, generator=gen).to(DEVICE)
    with torch.no_grad():
        y_inf = f(x)[0]
    y = f(x)[0]
    assert y.grad_fn is not None and "triton_fwd" in y.grad_fn.name()
    assert torch.equal(y_inf, y.detach())
    assert triton_backend.inference is torch.ops.fusedgru.triton_infer


def test_dispatcher_configs():
    # Small H: one launch for all steps; large H: H split across programs.
    assert gru.choose_config(16, 64, torch.float32).strategy == "resident"
    assert gru.choose_config(16, 1, torch.float32) == gru.Config("resident", 16, 16, 0, 4)
    big = gru.choose_config(16, 512, torch.bfloat16)
    assert big.strategy == "step" and big.block_h * 16 == 512
    with gru.force_config(SMALL_STEP):
        assert gru.choose_config(1, 1, torch.float32) is SMALL_STEP
    assert gru.choose_config(1, 1, torch.float32).strategy == "resident"


def test_dispatcher_persistent_only_where_the_grid_is_coresident():
    # The default above RESIDENT_MAX stays "step" until a GPU measurement picks one.
    assert gru.LARGE_H_STRATEGY in gru.LARGE_H_STRATEGIES
    pick = lambda B, H, cap: gru.choose_config(B, H, torch.bfloat16, cap, "persistent")
    cfg = pick(16, 1024, 132)  # 1 row block x 32 column blocks
    assert cfg.strategy == "persistent" and cfg.programs(16, 1024) == 32
    assert pick(16, 1024, 31).strategy == "step"  # would not all be resident
    assert pick(256, 1024, 132).strategy == "step"  # 8 x 32 programs
    assert pick(16, 1024, 0).strategy == "step"  # unknown capacity
    assert pick(16, 64, 132).strategy == "resident"
    assert gru.choose_config(16, 1024, torch.bfloat16, 132, "step").strategy == "step"
    assert gru.max_coresident_programs(torch.device("cpu")) == 1
    with pytest.raises(ValueError, match="strategy"):
        gru.Config("barrier", 16, 32)


def test_strategy_config_forces_a_large_h_strategy_or_says_why_not(monkeypatch):
    cpu = torch.device("cpu")  # one co-resident program (the interpreter)
    assert gru.strategy_config("step", 16, 1024, torch.bfloat16, cpu) == \
        gru.choose_config(16, 1024, torch.bfloat16, 1, "step")
    with pytest.raises(ValueError, match=r"32 programs > 1 co-resident"):
        gru.strategy_config("persistent", 16, 1024, torch.bfloat16, cpu)
    with pytest.raises(ValueError, match="H=64 is resident"):
        gru.strategy_config("step", 16, 64, torch.float32, cpu)
    with pytest.raises(ValueError, match="strategy must be one of"):
        gru.strategy_config("resident", 16, 1024, torch.float32, cpu)
    monkeypatch.setattr(gru, "max_coresident_programs", lambda device: 132)
    cfg = gru.strategy_config("persistent", 16, 1024, torch.bfloat16, cpu)
    assert cfg.strategy == "persistent" and cfg.programs(16, 1024) == 32
    monkeypatch.setattr(gru, "LARGE_H_STRATEGY", "persistent")  # whatever the default is
    assert gru.strategy_config("step", 16, 1024, torch.bfloat16, cpu).strategy == "step"


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
def test_module_bidirectional_multilayer(reset_after, gen):
    """FusedGRU(backend="triton") vs the float64 oracle, within SPEC's budget set by
    torch.nn.GRU (reset_after=True) or the reference backend (reset_after=False) in fp32."""
    T, B, I, H, L = 5, 3, 7, 5, 2
    torch.manual_seed(gen.initial_seed() % 2**31)
    kw = dict(num_layers=L, bidirectional=True, batch_first=False)
    oracle = fusedgru.FusedGRU(I, H, dtype=torch.float64, reset_after=reset_after,
                               backend="reference", **kw)
    x64 = torch.randn(T, B, I, dtype=torch.float64, generator=gen)
    h064 = torch.randn(2 * L, B, H, dtype=torch.float64, generator=gen) * 0.5
    gout = torch.randn(T, B, 2 * H, dtype=torch.float64, generator=gen)
    ghn = torch.randn(2 * L, B, H, dtype=torch.float64, generator=gen)

    def run(mod, dtype):
        mod = mod.to(device=DEVICE)
        x = x64.to(DEVICE, dtype).detach().clone().requires_grad_()
        h0 = h064.to(DEVICE, dtype).detach().clone().requires_grad_()
        out, hn = mod(x, h0)
        ((out * gout.to(DEVICE, dtype)).sum() + (hn * ghn.to(DEVICE, dtype)).sum()).backward()
        res = {"out": out, "h_n": hn, "dx": x.grad, "dh0": h0.grad}
        res.update({"d" + k: p.grad for k, p in mod.named_parameters()})
        return res

    sd = {k: v.float() for k, v in oracle.state_dict().items()}
    kernel = fusedgru.FusedGRU(I, H, reset_after=reset_after, backend="triton", **kw)
    kernel.load_state_dict(sd)
    if reset_after:
        baseline = torch.nn.GRU(I, H, **kw)
    else:
        baseline = fusedgru.FusedGRU(I, H, reset_after=False, backend="reference", **kw)
    baseline.load_state_dict(sd)
    want = run(oracle, torch.float64)
    got = run(kernel, torch.float32)
    base = run(baseline, torch.float32)
    assert set(got) == set(want) and len(got) == 4 + 4 * 2 * L
    for k in want:
        err, lim = testing.rel_err(got[k], want[k]), testing.budget(
            torch.float32, testing.rel_err(base[k], want[k]))
        assert err <= lim, f"{k}: err {err:.3g} > budget {lim:.3g}"


def test_float64_refused_with_clear_error():
    why = triton_backend.unsupported_reason("cpu", torch.float64)
    assert why is not None and "float64" in why and "reference" in why
    assert "float64" in triton_backend.unsupported_reason("cuda", torch.float64)
    gru64 = fusedgru.FusedGRU(3, 4, dtype=torch.float64, backend="triton")
    with pytest.raises(backends.BackendUnavailableError, match="float64"):
        gru64(torch.randn(2, 1, 3, dtype=torch.float64))


def test_dtype_and_device_support():
    assert triton_backend.unavailable_reason() is None
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert triton_backend.unsupported_reason("cuda", dt) is None
    assert "int" in str(triton_backend.unsupported_reason("cuda", torch.int32))
    if gru.INTERPRET:
        assert triton_backend.unsupported_reason("cpu", torch.float32) is None
        assert "interpreter" in triton_backend.unsupported_reason("cpu", torch.bfloat16)
    assert triton_backend.unsupported_reason("mps", torch.float32) is not None


def test_registered_ops(gen):
    """The ops carry fusedgru's schema and fake implementations (torch.compile-traceable)."""
    case = testing.make_layer_case(2, 3, 4, 5, reset_after=True, generator=gen)
    x, h0, w_ih, w_hh, b_ih, b_hh = case.args(DEVICE, torch.float32)
    fwd_args = (x, h0, w_ih, w_hh, b_ih, b_hh, True)
    torch.library.opcheck(torch.ops.fusedgru.triton_fwd.default, fwd_args,
                          test_utils=("test_schema", "test_faketensor"))
    y, ws = torch.ops.fusedgru.triton_fwd(*fwd_args)
    gy = case.grad_y.to(DEVICE, torch.float32)
    torch.library.opcheck(torch.ops.fusedgru.triton_bwd.default,
                          (gy, x, h0, w_ih, w_hh, y, ws, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fusedgru.triton_infer.default, fwd_args,
                          test_utils=("test_schema", "test_faketensor"))
    assert triton_backend.forward is torch.ops.fusedgru.triton_fwd
    assert math.isfinite(y.sum().item())


# ----------------------------------------------------------------------------------------
# Sequence structure (issue 19): packed rows (batch_sizes) and resets inside the kernels
# ----------------------------------------------------------------------------------------
# Lengths of the packed cases: skewed, with ties and length-1 sequences (sorted, as the ops
# take them).  TWO_BLOCKS: 19 rows, so a block of 16 rows runs out after step 0 (the second
# row block's rows all have length 1) while the first goes on.
SKEWED = [7, 4, 4, 1, 1]
TWO_BLOCKS = [5, 5, 4, 4, 4, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1]


def _packed(dense: torch.Tensor, lengths) -> torch.Tensor:
    """(T, B, .) -> the packed (N, .) rows of sequences of ``lengths`` (sorted)."""
    T = dense.shape[0]
    mask = torch.arange(T)[:, None] < torch.tensor(lengths)[None, :]
    return dense[mask]  # time-major: step t's rows, then step t+1's


def _batch_sizes(lengths) -> torch.Tensor:
    return torch.tensor([sum(n > t for n in lengths) for t in range(max(lengths))],
                        dtype=torch.int64)


def _resets(T, B, gen) -> torch.Tensor:
    """Random resets (p = 0.3), and: row 0 at t = 0, row 1 at the last step, row 2 at
    every step."""
    rs = torch.rand(T, B, generator=gen) < 0.3
    rs[0, 0] = True
    rs[T - 1, 1] = True
    rs[:, 2] = True
    return rs


def _seq_case(kind, T, B, I, H, reset_after, with_h0, gen, lengths=None):
    """(args in float64 on the CPU: x, h0, w_ih, w_hh, b_ih, b_hh; grad_y; seq kwargs)."""
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, with_h0=with_h0,
                                   generator=gen)
    args = case.args(None, torch.float64)
    gy = case.grad_y
    if kind == "packed":
        args[0], gy = _packed(args[0], lengths), _packed(gy, lengths)
        seq = dict(batch_sizes=_batch_sizes(lengths), resets=None)
    else:
        seq = dict(batch_sizes=None, resets=_resets(T, B, gen))
    return args, gy, seq


def _to(t, dtype, device=DEVICE):
    return None if t is None else t.to(device, dtype).contiguous()


def _run_ops(ops_ns, args, gy, seq, reset_after, dtype, device):
    """forward, inference (where the row has one) and backward of one backend's ops."""
    a = [_to(t, dtype, device) for t in args]
    bs, rs = seq["batch_sizes"], _to(seq["resets"], torch.bool, device)
    fwd, bwd = getattr(ops_ns, "_fwd"), getattr(ops_ns, "_bwd")
    y, ws = fwd(*a, reset_after, bs, rs)
    out = {"y": y, "ws": ws}
    if getattr(ops_ns, "_infer", None) is not None:
        out["y_infer"] = ops_ns._infer(*a, reset_after, bs, rs)
    grads = bwd(_to(gy, dtype, device), a[0], a[1], a[2], a[3], y, ws, reset_after, bs, rs)
    out.update(zip(testing.GRAD_NAMES, grads))
    return out


class _Ops:
    def __init__(self, name, infer=False):
        self._fwd = getattr(torch.ops.fusedgru, f"{name}_fwd")
        self._bwd = getattr(torch.ops.fusedgru, f"{name}_bwd")
        self._infer = getattr(torch.ops.fusedgru, f"{name}_infer") if infer else None


def _assert_seq_ops_within_budget(args, gy, seq, reset_after):
    """The triton ops (float32) vs the reference ops in float64, within SPEC's budget set by
    the reference ops in float32 on the same inputs: y, ws, inference y, the 6 gradients."""
    want = _run_ops(_Ops("reference"), args, gy, seq, reset_after, torch.float64, "cpu")
    base = _run_ops(_Ops("reference"), args, gy, seq, reset_after, torch.float32, DEVICE)
    got = _run_ops(_Ops("triton", infer=True), args, gy, seq, reset_after, torch.float32,
                   DEVICE)
    base["y_infer"], want["y_infer"] = base["y"], want["y"]
    assert set(got) == set(want) and len(got) == 9
    for k in want:
        err = testing.rel_err(got[k], want[k])
        lim = testing.budget(torch.float32, testing.rel_err(base[k], want[k]))
        assert err <= lim, f"{k}: err {err:.3g} > budget {lim:.3g}"


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
@pytest.mark.parametrize("strategy", ["resident", "step", "persistent"])
def test_packed_ops_vs_reference(strategy, reset_after, gen):
    """batch_sizes: the ops on the packed rows (skewed lengths, ties, length-1 sequences)
    equal the reference's; every strategy (H = 17: 2 column blocks and 2 K chunks for the
    split kernels)."""
    T, B, I, H = 7, 5, 4, 17
    args, gy, seq = _seq_case("packed", T, B, I, H, reset_after, strategy != "step", gen,
                              lengths=SKEWED)
    assert args[0].shape[0] == sum(SKEWED)
    with gru.force_config(None if strategy == "resident" else CONFIGS[strategy]):
        assert gru.choose_config(B, H, torch.float32).strategy == strategy
        _assert_seq_ops_within_budget(args, gy, seq, reset_after)


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
@pytest.mark.parametrize("strategy", ["resident", "step", "persistent"])
def test_resets_ops_vs_reference(strategy, reset_after, gen):
    """resets: random, at t = 0 (with h0: its row's h0 unused, dh0 zero there), at the last
    step, every step of one row; every strategy."""
    T, B, I, H = 6, 5, 3, 17
    args, gy, seq = _seq_case("resets", T, B, I, H, reset_after, strategy != "step", gen)
    with gru.force_config(None if strategy == "resident" else CONFIGS[strategy]):
        assert gru.choose_config(B, H, torch.float32).strategy == strategy
        _assert_seq_ops_within_budget(args, gy, seq, reset_after)


@pytest.mark.parametrize("kind", ["packed", "resets"])
@pytest.mark.parametrize("strategy", ["resident", "step", "persistent"])
def test_sequence_writes_its_rows_and_no_others(strategy, kind, gen):
    """The launchers on NaN-poisoned outputs followed by a guard band (also NaN): every
    element of y, ws, dgi, dgh, dh0 written, nothing past them (packed: no padded row
    exists to write), and the inference forward (ws=None) equals y.  Packed: 19 rows whose
    second block of 16 stops after step 0 (resident: that block's loop ends; a launch per
    unit: one row block from step 1 on); resets both formulations over the strategies."""
    reset_after = strategy != "step" if kind == "packed" else strategy == "step"
    H, I = 19, 4
    if kind == "packed":
        lengths = TWO_BLOCKS if strategy != "persistent" else SKEWED  # one program there
        T, B = lengths[0], len(lengths)
    else:
        lengths, T, B = None, 4, 17 if strategy != "persistent" else 5
    args, gy, seq = _seq_case(kind, T, B, I, H, reset_after, True, gen, lengths=lengths)
    x, h0, w_ih, w_hh, b_ih, b_hh = [_to(t, torch.float32) for t in args]
    bs, rs = seq["batch_sizes"], _to(seq["resets"], torch.bool)
    rows = x.shape[:-1]
    GUARD = 7

    def poisoned(*shape):  # a view of the first prod(shape) elements, NaN after them too
        n = math.prod(shape)
        return torch.full((n + GUARD,), float("nan"), device=DEVICE)[:n].view(shape)

    def guard_intact(t):
        full = torch.as_strided(t, (t.numel() + GUARD,), (1,))
        return bool(torch.isnan(full[t.numel():]).all())

    gi = reference._input_projection(x, w_ih, b_ih).contiguous()
    cfg = CONFIGS[strategy]
    y, ws = poisoned(*rows, H), poisoned(*rows, 4 * H)
    gru.launch_forward(gi, h0, w_hh, b_hh, y, ws, reset_after, cfg, batch_sizes=bs, resets=rs)
    y_inf = poisoned(*rows, H)
    gru.launch_forward(gi, h0, w_hh, b_hh, y_inf, None, reset_after, cfg, batch_sizes=bs,
                       resets=rs)
    dgi, dgh, dh0 = poisoned(*rows, 3 * H), poisoned(*rows, 3 * H), poisoned(B, H)
    gru.launch_backward(_to(gy, torch.float32), h0, w_hh, y, ws, dgi, dgh, dh0, reset_after,
                        cfg, batch_sizes=bs, resets=rs)
    for name, t in (("y", y), ("ws", ws), ("y_infer", y_inf), ("dgi", dgi), ("dgh", dgh),
                    ("dh0", dh0)):
        assert torch.isfinite(t).all(), f"{name}: {int((~torch.isfinite(t)).sum())} unwritten"
        assert guard_intact(t), f"{name}: written past its last row"
    assert torch.equal(y_inf, y)
    y64, ws64 = reference.gru_layer_forward(*args, reset_after, **seq)
    grads64 = reference.gru_layer_backward(gy, *args[:4], y64, ws64, reset_after, **seq)
    assert testing.rel_err(y, y64) < 1e-5
    assert testing.rel_err(ws, ws64) < 1e-5
    assert testing.rel_err(dh0, grads64[1]) < 1e-5
    # dgi / dgh summed over the rows are the bias gradients
    assert testing.rel_err(dgi.sum(0 if kind == "packed" else (0, 1)), grads64[4]) < 1e-5
    assert testing.rel_err(dgh.sum(0 if kind == "packed" else (0, 1)), grads64[5]) < 1e-5


def test_sequence_structure_refused_where_it_does_not_apply(gen):
    x = torch.randn(4, 3, device=DEVICE)
    w_ih, w_hh = torch.randn(6, 3, device=DEVICE), torch.randn(6, 2, device=DEVICE)
    bs = torch.tensor([2, 1, 1])
    with pytest.raises(ValueError, match="cannot be combined"):
        torch.ops.fusedgru.triton_fwd(x, None, w_ih, w_hh, None, None, True, bs,
                                      torch.zeros(3, 2, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="non-increasing"):
        torch.ops.fusedgru.triton_fwd(x, None, w_ih, w_hh, None, None, True,
                                      torch.tensor([1, 2, 1]))
    with pytest.raises(ValueError, match="packed"):
        torch.ops.fusedgru.triton_fwd(x.view(2, 2, 3), None, w_ih, w_hh, None, None, True,
                                      torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="sums to 3"):
        torch.ops.fusedgru.triton_fwd(x, None, w_ih, w_hh, None, None, True,
                                      torch.tensor([2, 1]))
    with pytest.raises(ValueError, match=r"resets must be a bool \(T, B\) = \(2, 2\)"):
        torch.ops.fusedgru.triton_fwd(x.view(2, 2, 3), None, w_ih, w_hh, None, None, True,
                                      None, torch.zeros(2, 3, dtype=torch.bool, device=DEVICE))


def _module_runs(kw, I, H, make_input, reset_after=True, nn_baseline=True):
    """FusedGRU(backend="triton") in float32 and the float64 reference module, the same
    weights; outputs and every gradient -> dicts (want, got, base): base is nn.GRU
    (reset_after=True and nn_baseline) or the reference backend in float32, SPEC's
    baseline."""
    oracle = fusedgru.FusedGRU(I, H, dtype=torch.float64, reset_after=reset_after,
                               backend="reference", **kw)
    sd = {k: v.float() for k, v in oracle.state_dict().items()}
    kernel = fusedgru.FusedGRU(I, H, reset_after=reset_after, backend="triton", **kw)
    kernel.load_state_dict(sd)
    if reset_after and nn_baseline:
        baseline = torch.nn.GRU(I, H, **kw)
    else:
        baseline = fusedgru.FusedGRU(I, H, reset_after=reset_after, backend="reference", **kw)
    baseline.load_state_dict(sd)

    def run(mod, dtype, device):
        mod = mod.to(device=device)
        out, hn, leaves = make_input(mod, dtype, device)
        res = {"out": out, "h_n": hn}
        res.update({"d" + k: v.grad for k, v in leaves.items()})
        res.update({"d" + k: p.grad for k, p in mod.named_parameters()})
        return res

    return run(oracle, torch.float64, "cpu"), run(kernel, torch.float32, DEVICE), \
        run(baseline, torch.float32, "cpu")


def _assert_module_within_budget(want, got, base):
    assert set(got) == set(want)
    for k in want:
        err = testing.rel_err(got[k], want[k])
        lim = testing.budget(torch.float32, testing.rel_err(base[k], want[k]))
        assert err <= lim, f"{k}: err {err:.3g} > budget {lim:.3g}"


@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "unsorted"])
def test_module_packed_sequence(sorted_, gen):
    """FusedGRU(backend="triton") on a PackedSequence (2 layers, bidirectional): the triton
    ops run on the packed rows; outputs, h_n and every gradient within SPEC's budget of the
    float64 reference module, nn.GRU the baseline."""
    from torch.nn.utils.rnn import pack_padded_sequence

    T, B, I, H, L = 5, 4, 3, 5, 2
    torch.manual_seed(gen.initial_seed() % 2**31)
    lengths = [5, 3, 3, 1] if sorted_ else [3, 1, 5, 3]
    x64 = torch.randn(T, B, I, dtype=torch.float64, generator=gen)
    h064 = torch.randn(2 * L, B, H, dtype=torch.float64, generator=gen) * 0.5
    gout = torch.randn(sum(lengths), 2 * H, dtype=torch.float64, generator=gen)
    ghn = torch.randn(2 * L, B, H, dtype=torch.float64, generator=gen)

    def make_input(mod, dtype, device):
        x = x64.to(device, dtype).detach().clone().requires_grad_()
        h0 = h064.to(device, dtype).detach().clone().requires_grad_()
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=sorted_)
        out, hn = mod(packed, h0)
        ((out.data * gout.to(device, dtype)).sum() + (hn * ghn.to(device, dtype)).sum()).backward()
        return out.data, hn, {"x": x, "h0": h0}

    log = testing.OpLog()
    with log:
        want, got, base = _module_runs(dict(num_layers=L, bidirectional=True), I, H,
                                       make_input)
    assert any("triton_fwd" in n for n in log.names) and any("triton_bwd" in n for n in log.names)
    _assert_module_within_budget(want, got, base)


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
def test_module_resets(reset_after, gen):
    """FusedGRU(backend="triton")(x, h0, resets=...) (bidirectional: the reverse direction
    takes resets shifted by one) within SPEC's budget of the float64 reference module, the
    reference backend in float32 the baseline."""
    T, B, I, H = 5, 3, 4, 5
    torch.manual_seed(gen.initial_seed() % 2**31)
    x64 = torch.randn(T, B, I, dtype=torch.float64, generator=gen)
    h064 = torch.randn(2, B, H, dtype=torch.float64, generator=gen) * 0.5
    rs = _resets(T, B, gen)
    gout = torch.randn(T, B, 2 * H, dtype=torch.float64, generator=gen)

    def make_input(mod, dtype, device):
        x = x64.to(device, dtype).detach().clone().requires_grad_()
        h0 = h064.to(device, dtype).detach().clone().requires_grad_()
        out, hn = mod(x, h0, resets=rs.to(device))
        ((out * gout.to(device, dtype)).sum() + hn.sum()).backward()
        return out, hn, {"x": x, "h0": h0}

    # nn.GRU has no resets: the baseline is the reference backend in float32
    log = testing.OpLog()
    with log:
        want, got, base = _module_runs(dict(bidirectional=True), I, H, make_input,
                                       reset_after, nn_baseline=False)
    assert any("triton_fwd" in n for n in log.names) and any("triton_bwd" in n for n in log.names)
    _assert_module_within_budget(want, got, base)


@pytest.mark.skipif(not gru.INTERPRET, reason="programs in threads: Triton's interpreter")
@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
def test_packed_persistent_with_concurrent_programs(concurrent_programs, reset_after, gen):
    """The persistent launch on packed rows with 2 x 3 programs running at once (one thread
    each, tests/test_triton_concurrent.py): the second row block has no row after step 0,
    so it skips every later unit and only meets the grid barriers (a skipped barrier would
    hang: an error after the fixture's HANG_S); every packed row written, none past them
    (NaN guard rows), the result equal to the float64 reference."""
    lengths = TWO_BLOCKS
    T, B, I, H = lengths[0], len(lengths), 3, 33
    cfg = gru.Config("persistent", block_b=16, block_h=16, block_k=16, num_warps=4)
    assert cfg.programs(B, H) == 6
    args, gy, seq = _seq_case("packed", T, B, I, H, reset_after, True, gen, lengths=lengths)
    x, h0, w_ih, w_hh, b_ih, b_hh = [_to(t, torch.float32, "cpu") for t in args]
    bs = seq["batch_sizes"]
    N = x.shape[0]
    gi = reference._input_projection(x, w_ih, b_ih).contiguous()
    nan = float("nan")
    y_buf, ws_buf = torch.full((N + 4, H), nan), torch.full((N + 4, 4 * H), nan)
    y, ws = y_buf[:N], ws_buf[:N]
    gru.launch_forward(gi, h0, w_hh, b_hh, y, ws, reset_after, cfg, batch_sizes=bs)
    dgi_buf, dgh_buf = torch.full((N + 4, 3 * H), nan), torch.full((N + 4, 3 * H), nan)
    dh0 = torch.full((B, H), nan)
    gru.launch_backward(_to(gy, torch.float32, "cpu"), h0, w_hh, y, ws, dgi_buf[:N],
                        dgh_buf[:N], dh0, reset_after, cfg, batch_sizes=bs)
    for buf in (y_buf, ws_buf, dgi_buf, dgh_buf):
        assert torch.isfinite(buf[:N]).all() and torch.isnan(buf[N:]).all()
    y64, ws64 = reference.gru_layer_forward(*args, reset_after, **seq)
    _, dh0_64, _, _, db_ih64, db_hh64 = reference.gru_layer_backward(
        gy, *args[:4], y64, ws64, reset_after, **seq)
    assert testing.rel_err(y, y64) < 1e-5 and testing.rel_err(ws, ws64) < 1e-5
    assert testing.rel_err(dh0, dh0_64) < 1e-5
    assert testing.rel_err(dgi_buf[:N].sum(0), db_ih64) < 1e-5
    assert testing.rel_err(dgh_buf[:N].sum(0), db_hh64) < 1e-5


def test_aot_ci_set_compiles_packed_and_resets_specialisations():
    """What tests/test_triton_aot.py compiles for sm_90 / sm_80 (dispatch_specs("ci"))
    holds every kernel with SEQ 0 (dense), 1 (packed) and 2 (resets), persistent included
    (in a fresh process: the AOT module refuses the interpreter's)."""
    import os
    import subprocess
    import sys

    code = (
        "from fusedgru.kernels import aot\n"
        "seen={(s.kernel,s.constexprs['SEQ'],bool(s.constexprs.get('PERSIST'))) "
        "for s in aot.dispatch_specs('ci')}\n"
        "ks=('_fwd_resident_kernel','_bwd_resident_kernel','_fwd_split_kernel',"
        "'_bwd_split_kernel')\n"
        "want={(k,q,False) for k in ks for q in (0,1,2)}|"
        "{(k,q,True) for k in ks[2:] for q in (0,1,2)}\n"
        "assert want<=seen,sorted(want-seen)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
