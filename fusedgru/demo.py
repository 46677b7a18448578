"""`fusedgru demo`: the textbook character-level GRU language model, trained side by side.

    fusedgru demo --quick                 # < 2 minutes on 2 CPU cores
    python -m fusedgru.demo --epochs 50 --device cuda --out demo-out
    fusedgru demo --text my_novel.txt     # any UTF-8 file

The model is the one GRUs are usually taught with: characters one-hot encoded, one GRU layer
(256 hidden units), a linear output layer, random-offset minibatches of 32 sequences of 35
steps, SGD with learning rate 1, gradient clipping at norm 1, perplexity reported per epoch,
and a continuation of a prefix sampled at the end.

Four models, two pairs, because the two GRU formulations are different functions
(docs/SPEC.md section 1):

    fusedgru           FusedGRU(reset_after=True),  backend="auto"   } the same function:
    nn.GRU             torch.nn.GRU (always reset_after=True)        } nn.GRU's GRU
    fusedgru-textbook  FusedGRU(reset_after=False), backend="auto"   } the same function:
    scratch            fusedgru.reference.gru_scratch                } the textbook's GRU

All four start from the same draw of weights (one nn.GRU and one nn.Linear, copied into
each) and see the same minibatches in the same order, so within a pair the perplexity
curves agree to rounding; across pairs they are close but not equal (the reset gate acts
at a different place).  The textbook GRU has one bias per gate (b_z = b_iz + b_hz, ...);
FusedGRU(reset_after=False) has two, which for that formulation are redundant (b_hn sits
outside the reset product), so the demo folds bias_hh into bias_ih and freezes bias_hh at
zero: then the two have the same parameters, the same gradients, the same SGD steps.
(Training both biases would double the step on each merged bias: a different trajectory.)

The default corpus is the Book of Genesis, King James Version (fusedgru/data/, see
fusedgru/data/ABOUT.txt), reduced as in the textbook to lower-case letters and spaces.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bench.report import import_pyplot
from .modules import FusedGRU
from .reference import gru_scratch, scratch_params_from_torch

__all__ = ["main", "MODEL_NAMES", "load_text", "Vocab", "epoch_batches", "build_models"]

DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "genesis_kjv.txt")

# The four models; PAIRS: the two that compute the same function, twice.
MODEL_NAMES = ("fusedgru", "nn.GRU", "fusedgru-textbook", "scratch")
PAIRS = (("fusedgru", "nn.GRU"), ("fusedgru-textbook", "scratch"))
DESCRIPTIONS = {
    "fusedgru": "FusedGRU(reset_after=True)",
    "nn.GRU": "torch.nn.GRU",
    "fusedgru-textbook": "FusedGRU(reset_after=False)",
    "scratch": "reference.gru_scratch",
}
# The speed-ups printed: FusedGRU over each model of the same formulation and over the
# other two named in the textbook story (nn.GRU and the scratch GRU).
SPEEDUPS = (("fusedgru", "nn.GRU"), ("fusedgru", "scratch"), ("fusedgru-textbook", "scratch"),
            ("fusedgru-textbook", "nn.GRU"))

# --quick: the textbook's model (256 hidden) on the first 50,000 characters for 8 epochs:
# about 6 s an epoch for all four models on 2 idle CPU cores (about a minute in all), and
# perplexity falls clearly (about 16 in epoch 1 to about 8).
QUICK = {"epochs": 8, "max_chars": 50_000}


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


def load_text(path: str, raw: bool = False, max_chars: Optional[int] = None) -> str:
    """The corpus as one string.  Unless ``raw``: the textbook's preprocessing, every run
    of non-letters replaced by one space and everything lower-cased (27 characters)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not raw:
        text = re.sub(r"[^A-Za-z]+", " ", text).strip().lower()
    if max_chars is not None:
        text = text[:max_chars]
    return text


class Vocab:
    """Characters <-> indices, sorted so that the same text gives the same indices."""

    def __init__(self, text: str) -> None:
        self.chars: List[str] = sorted(set(text))
        self.index: Dict[str, int] = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> List[int]:
        missing = sorted(set(text) - set(self.index))
        if missing:
            raise ValueError(f"characters not in the corpus vocabulary: {missing!r}")
        return [self.index[c] for c in text]

    def decode(self, indices: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in indices)


def epoch_batches(corpus: Tensor, batch_size: int, num_steps: int,
                  rng: random.Random) -> List[Tuple[Tensor, Tensor]]:
    """The textbook's random sampling: drop a random offset of 0..num_steps-1 characters,
    cut the rest into non-overlapping subsequences of num_steps, shuffle them and group
    them in minibatches.  corpus: (N,) int64.  Returns [(X (B, T), Y (B, T))], Y = X + 1."""
    offset = rng.randint(0, num_steps - 1)
    num_subseqs = (corpus.numel() - offset - 1) // num_steps
    starts = [offset + i * num_steps for i in range(num_subseqs)]
    rng.shuffle(starts)
    batches = []
    for k in range(0, num_subseqs - batch_size + 1, batch_size):
        idx = torch.tensor(starts[k:k + batch_size]).unsqueeze(1) + torch.arange(num_steps)
        batches.append((corpus[idx], corpus[idx + 1]))
    return batches


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------


class CharLM(nn.Module):
    """One-hot characters -> GRU -> linear layer.  ``rnn`` maps (X (T, B, V), h (B, H) or
    None) to (outputs (T, B, H), h (B, H)); the four models differ only in it."""

    def __init__(self, kind: str, init_gru: nn.GRU, init_out: nn.Linear, backend: str) -> None:
        super().__init__()
        self.kind = kind
        self.vocab_size = init_gru.input_size
        self.hidden_size = init_gru.hidden_size
        if kind == "nn.GRU":
            self.gru = copy.deepcopy(init_gru)
        elif kind in ("fusedgru", "fusedgru-textbook"):
            textbook = kind == "fusedgru-textbook"
            w = init_gru.weight_hh_l0
            self.gru = FusedGRU(self.vocab_size, self.hidden_size, device=w.device,
                                dtype=w.dtype, reset_after=not textbook, backend=backend)
            self.gru.load_state_dict(init_gru.state_dict())
            if textbook:
                # The textbook's one bias per gate: b_ih + b_hh in bias_ih, bias_hh frozen at 0.
                with torch.no_grad():
                    self.gru.bias_ih_l0 += self.gru.bias_hh_l0
                    self.gru.bias_hh_l0.zero_()
                self.gru.bias_hh_l0.requires_grad_(False)
        elif kind == "scratch":
            g = init_gru
            params = scratch_params_from_torch(g.weight_ih_l0, g.weight_hh_l0, g.bias_ih_l0,
                                               g.bias_hh_l0)
            self.params = nn.ParameterList(
                [nn.Parameter(p.detach().clone().contiguous()) for p in params])
        else:
            raise ValueError(f"kind: expected one of {MODEL_NAMES}, got {kind!r}")
        self.out = copy.deepcopy(init_out)

    def rnn(self, x: Tensor, h: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if self.kind == "scratch":
            if h is None:
                h = x.new_zeros(x.shape[1], self.hidden_size)
            y, (h,) = gru_scratch(x, (h,), list(self.params))
            return y, h
        y, h_n = self.gru(x, None if h is None else h.unsqueeze(0))
        return y, h_n[0]

    def forward(self, tokens: Tensor, h: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """tokens: (B, T) int64 -> logits (T*B, V) time-major, h (B, H)."""
        x = F.one_hot(tokens.T, self.vocab_size).to(self.out.weight.dtype)  # (T, B, V)
        y, h = self.rnn(x, h)
        return self.out(y.reshape(-1, self.hidden_size)), h


def build_models(names: Sequence[str], vocab_size: int, hidden: int, device, seed: int,
                 backend: str = "auto") -> Dict[str, CharLM]:
    """The models named, all from the same seeded draw of initial weights (nn.GRU's and
    nn.Linear's own initialisation)."""
    torch.manual_seed(seed)
    init_gru = nn.GRU(vocab_size, hidden, device=device)
    init_out = nn.Linear(hidden, vocab_size, device=device)
    return {name: CharLM(name, init_gru, init_out, backend) for name in names}


def trainable(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------
# Training and sampling
# ----------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(model: CharLM, batches, optimizer, clip: float, device: torch.device,
                bar=None) -> Tuple[float, float]:
    """One pass over ``batches``, a fresh zero state per minibatch (random sampling).
    Returns (perplexity, seconds)."""
    model.train()
    params = trainable(model)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    _sync(device)
    start = time.perf_counter()
    for X, Y in batches:
        X, Y = X.to(device), Y.to(device)
        logits, _ = model(X)
        loss = F.cross_entropy(logits, Y.T.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        total_loss += loss.detach().double() * Y.numel()
        n += Y.numel()
        if bar is not None:
            bar.update(1)
    ppl = math.exp(total_loss.item() / n)  # .item() synchronises the device
    _sync(device)
    return ppl, time.perf_counter() - start


@torch.no_grad()
def sample(model: CharLM, vocab: Vocab, prefix: str, length: int, temperature: float,
           seed: int, device: torch.device) -> str:
    """Warm the state up on ``prefix``, then draw ``length`` characters one at a time:
    argmax when temperature == 0, else from softmax(logits / temperature) with a generator
    seeded with ``seed`` (every model draws from the same random stream)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([vocab.encode(prefix)], device=device)  # (1, len)
    logits, h = model(tokens)
    out = []
    for _ in range(length):
        last = logits[-1].double().cpu()
        if temperature == 0:
            nxt = int(last.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(last / temperature, 0), 1, generator=gen))
        out.append(nxt)
        logits, h = model(torch.tensor([[nxt]], device=device), h)
    return prefix + vocab.decode(out)


# ----------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------


@dataclass
class History:
    perplexity: List[float] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)
    tokens_per_s: List[float] = field(default_factory=list)


def epoch_seconds(h: History) -> float:
    """Median seconds per epoch, leaving out the first (warm-up, allocator, JIT builds)
    when there are more: the machine may be shared, and the median ignores the odd slow one."""
    s = h.seconds[1:] if len(h.seconds) > 1 else h.seconds
    return statistics.median(s)


def max_rel_diff(a: Sequence[float], b: Sequence[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def summary_rows(histories: Dict[str, History], tokens_per_epoch: int) -> List[List[str]]:
    rows = []
    for name, h in histories.items():
        t = epoch_seconds(h)
        rows.append([name, DESCRIPTIONS[name], f"{h.perplexity[0]:.2f}",
                     f"{h.perplexity[-1]:.3f}", f"{t:.2f}", f"{tokens_per_epoch / t:,.0f}"])
    return rows


def format_table(header: List[str], rows: List[List[str]]) -> str:
    """A GitHub-flavoured markdown table (reads as plain text too)."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in rows])


def save_plot(histories: Dict[str, History], path: str, title: str) -> Optional[str]:
    """Left: perplexity against epoch (the curves of a pair lie on top of each other).
    Right: how far apart they are, per epoch: each pair, and for contrast the two
    formulations (a different function from the same weights).  Returns why no plot was
    written (matplotlib missing), or None."""
    plt, why = import_pyplot()
    if plt is None:
        return why
    styles = {"fusedgru": ("C0", "-", "o"), "nn.GRU": ("C1", "--", "x"),
              "fusedgru-textbook": ("C2", "-", "s"), "scratch": ("C3", "--", "+")}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for name, h in histories.items():
        color, ls, marker = styles[name]
        epochs = range(1, len(h.perplexity) + 1)
        ax.plot(epochs, h.perplexity, color=color, linestyle=ls, marker=marker, markersize=5,
                label=f"{name} ({DESCRIPTIONS[name]})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training perplexity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)

    contrasts = [(a, b, f"{a} vs {b} (same function)") for a, b in PAIRS]
    contrasts.append(("fusedgru", "fusedgru-textbook",
                      "fusedgru vs fusedgru-textbook (other formulation)"))
    drawn = 0
    for k, (a, b, label) in enumerate(contrasts):
        if a in histories and b in histories:
            drawn += 1
            pa, pb = histories[a].perplexity, histories[b].perplexity
            # A difference of exactly 0 has no place on a log axis: shown at 1e-12.
            rel = [max(abs(x - y) / abs(y), 1e-12) for x, y in zip(pa, pb)]
            ax2.plot(range(1, len(rel) + 1), rel, marker="o", markersize=4,
                     linestyle=":" if k == len(contrasts) - 1 else "-", label=label)
    ax2.set_yscale("log")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("relative difference of perplexity")
    ax2.set_title("agreement (fp32 rounding is ~1e-7)", fontsize=9)
    ax2.grid(True, which="both", alpha=0.3)
    if drawn:
        ax2.legend(fontsize=8, loc="center right")
    else:
        ax2.text(0.5, 0.5, "no two of these models compute the same function",
                 ha="center", va="center", transform=ax2.transAxes, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fusedgru demo",
        description="The textbook character-level GRU language model, trained with FusedGRU, "
                    "torch.nn.GRU and the textbook's scratch GRU from the same initial weights "
                    "on the same minibatches.",
        epilog="Models: fusedgru and nn.GRU compute nn.GRU's GRU (reset_after=True); "
               "fusedgru-textbook and scratch compute the textbook's GRU (reset_after=False). "
               "The curves of each pair agree to rounding.")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="a UTF-8 text file to train on (default: the bundled Book of Genesis, "
                        "King James Version)")
    p.add_argument("--raw", action="store_true",
                   help="keep the text as it is (default: lower-case letters and spaces only, "
                        "as the textbook does)")
    p.add_argument("--max-chars", type=int, default=None,
                   help="train on the first N characters only (after preprocessing)")
    p.add_argument("--quick", action="store_true",
                   help=f"a short run, under 2 minutes on 2 CPU cores: {QUICK['epochs']} epochs, "
                        f"the first {QUICK['max_chars']:,} characters (explicit options override "
                        "these)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice); 1 is steadier on a "
                        "machine shared with other work")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"default 20 (--quick: {QUICK['epochs']})")
    p.add_argument("--hidden", type=int, default=None, help="hidden units (default 256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-steps", type=int, default=35, help="sequence length")
    p.add_argument("--lr", type=float, default=1.0, help="SGD learning rate")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default=",".join(MODEL_NAMES),
                   help=f"comma-separated subset of {','.join(MODEL_NAMES)} (default: all)")
    p.add_argument("--backend", default="auto",
                   help="FusedGRU's backend (default auto: the fastest for the device)")
    p.add_argument("--prefix", default="and god said ", help="the prefix to continue")
    p.add_argument("--sample-len", type=int, default=80, help="characters to generate")
    p.add_argument("--temperature", type=float, default=0.5,
                   help="sampling temperature; 0 = argmax, as the textbook (default 0.5)")
    p.add_argument("--out", default=os.path.join("out", "demo"), metavar="DIR",
                   help="where demo.json and demo.png go (default ./out/demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    if args.quick:
        args.epochs = QUICK["epochs"] if args.epochs is None else args.epochs
        args.max_chars = QUICK["max_chars"] if args.max_chars is None else args.max_chars
    args.epochs = 20 if args.epochs is None else args.epochs
    args.hidden = 256 if args.hidden is None else args.hidden
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for name, value in (("epochs", args.epochs), ("threads", args.threads or 1),
                        ("hidden", args.hidden), ("batch-size", args.batch_size),
                        ("num-steps", args.num_steps)):
        if value <= 0:
            p.error(f"--{name}: expected a positive integer, got {value}")
    unknown = [m for m in args.models if m not in MODEL_NAMES]
    if unknown or not args.models or len(set(args.models)) != len(args.models):
        p.error(f"--models: expected distinct names from {','.join(MODEL_NAMES)}, "
                f"got {','.join(args.models)}")
    if args.temperature < 0:
        p.error(f"--temperature: expected >= 0, got {args.temperature}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fusedgru demo: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the progress bar is a nicety, not a dependency
        tqdm = None

    path = args.text or DEFAULT_TEXT
    text = load_text(path, raw=args.raw, max_chars=args.max_chars)
    vocab = Vocab(text)
    need = args.batch_size * args.num_steps + args.num_steps + 1
    if len(text) < need:
        print(f"fusedgru demo: {path}: {len(text)} characters after preprocessing; need at "
              f"least {need} for one minibatch of {args.batch_size} x {args.num_steps}",
              file=sys.stderr)
        return 2
    try:
        vocab.encode(args.prefix)
    except ValueError as exc:
        print(f"fusedgru demo: --prefix: {exc}", file=sys.stderr)
        return 2
    corpus = torch.tensor(vocab.encode(text), dtype=torch.long)

    models = build_models(args.models, len(vocab), args.hidden, device, args.seed, args.backend)
    optimizers = {name: torch.optim.SGD(trainable(m), lr=args.lr) for name, m in models.items()}
    fused_backend = next((m.gru.backend_in_use for m in models.values()
                          if isinstance(getattr(m, "gru", None), FusedGRU)), None)
    threads = torch.get_num_threads()
    print(f"corpus: {os.path.basename(path)}, {len(text):,} characters, vocabulary {len(vocab)}")
    print(f"model: one-hot -> GRU({args.hidden}) -> linear; batch {args.batch_size} x "
          f"{args.num_steps} steps, SGD lr {args.lr}, clip {args.clip}, seed {args.seed}")
    print(f"device: {device}" + (f" ({threads} threads)" if device.type == "cpu" else
                                 f" ({torch.cuda.get_device_name(device)})"))
    if fused_backend is not None:
        print(f"FusedGRU backend: {fused_backend}")

    histories = {name: History() for name in models}
    batch_rng = random.Random(args.seed)
    tokens_per_epoch = 0
    for epoch in range(1, args.epochs + 1):
        batches = epoch_batches(corpus, args.batch_size, args.num_steps, batch_rng)
        tokens_per_epoch = len(batches) * args.batch_size * args.num_steps
        line = []
        for name, model in models.items():
            bar = None
            if tqdm is not None and not args.no_progress:
                bar = tqdm(total=len(batches), desc=f"epoch {epoch}/{args.epochs} {name}",
                           leave=False, unit="batch", file=sys.stderr)
            # Every model starts the epoch from the same torch RNG state (nothing in training
            # draws from it today; this keeps it so if something ever does).
            torch.manual_seed(args.seed + epoch)
            ppl, secs = train_epoch(model, batches, optimizers[name], args.clip, device, bar)
            if bar is not None:
                bar.close()
            h = histories[name]
            h.perplexity.append(ppl)
            h.seconds.append(secs)
            h.tokens_per_s.append(tokens_per_epoch / secs)
            line.append(f"{name} ppl {ppl:.3f} {tokens_per_epoch / secs:,.0f} tok/s")
        print(f"epoch {epoch:3d}/{args.epochs}: " + " | ".join(line), flush=True)

    samples = {name: sample(m, vocab, args.prefix, args.sample_len, args.temperature, args.seed,
                            device) for name, m in models.items()}
    print(f"\nsamples (temperature {args.temperature}, seed {args.seed}):")
    for name, s in samples.items():
        print(f"  {name:18s} {s!r}")

    header = ["model", "computes", "ppl epoch 1", "final ppl", "s / epoch", "tokens / s"]
    table = format_table(header, summary_rows(histories, tokens_per_epoch))
    speedups = {f"{a} over {b}": epoch_seconds(histories[b]) / epoch_seconds(histories[a])
                for a, b in SPEEDUPS if a in histories and b in histories}
    agreement = {f"{a} vs {b}": max_rel_diff(histories[a].perplexity, histories[b].perplexity)
                 for a, b in PAIRS if a in histories and b in histories}
    print(f"\nsummary ({args.epochs} epochs of {tokens_per_epoch:,} tokens; s / epoch is the "
          "median over epochs 2.., wall clock on a possibly shared machine):")
    print(table)
    for k, v in speedups.items():
        print(f"speed-up {k}: {v:.2f}x")
    for k, v in agreement.items():
        print(f"same function, {k}: perplexity curves agree to {v:.1e} (max relative difference)")

    os.makedirs(args.out, exist_ok=True)
    figures = {
        "config": {k: getattr(args, k) for k in ("epochs", "hidden", "batch_size", "num_steps",
                                                 "lr", "clip", "seed", "models", "backend",
                                                 "prefix", "sample_len", "temperature",
                                                 "raw", "max_chars", "quick")},
        "corpus": {"path": path, "characters": len(text), "vocabulary": vocab.chars},
        "tokens_per_epoch": tokens_per_epoch,
        "machine": {"device": str(device), "torch": torch.__version__,
                    "python": platform.python_version(), "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "torch_threads": threads,
                    "cuda_device": torch.cuda.get_device_name(device)
                    if device.type == "cuda" else None,
                    "fusedgru_backend": fused_backend},
        "models": {name: {"computes": DESCRIPTIONS[name], "perplexity": h.perplexity,
                          "seconds": h.seconds, "tokens_per_s": h.tokens_per_s,
                          "seconds_per_epoch": epoch_seconds(h), "sample": samples[name]}
                   for name, h in histories.items()},
        "speedup": speedups,
        "agreement": agreement,
    }
    js = os.path.join(args.out, "demo.json")
    with open(js, "w") as f:
        json.dump(figures, f, indent=1)
    png = os.path.join(args.out, "demo.png")
    title = (f"char-level GRU LM, {os.path.basename(path)}, H={args.hidden}, {device.type}, "
             f"FusedGRU backend {fused_backend}")
    why = save_plot(histories, png, title)
    print(f"\nwrote {js}" + (f" and {png}" if why is None else f" ({why})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
