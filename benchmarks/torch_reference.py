"""PyTorch reference for the training-throughput goals: the same model and loss, two ways.

    python benchmarks/torch_reference.py --dtype bfloat16 --batch_size 128 --compare --out t.json
    python benchmarks/torch_reference.py --image_arch tiny --text_arch tiny --image_size 32 \
        --text_length 8 --batch_size 8 --steps 3 --warmup 1 --no_compile     # CPU smoke run

Model: transformers' ``ResNetModel`` (bottleneck ResNet-50 config: the same v1.5 network as
jaxmm's tower) + ``DistilBertModel`` ([CLS] pooling), jaxmm's fusion head (per-tower projection +
LayerNorm, modality dropout to a learned null vector, concat, dropout, MLP) and class-weighted
cross-entropy; AdamW with jaxmm's per-tower learning rates, no decay on 1-D parameters and
global-norm clipping at 1.0. Random init; same synthetic batch shapes as
``train_throughput.py``. Modes, on the same device:
  original: how the original project trains: float32, eager, NCHW, PyTorch defaults (no TF32
            matmuls), ``loss.item()`` and accuracy ``.item()`` every step (a host sync per step);
  tuned:    bf16 autocast (--dtype bfloat16) or TF32 (--dtype float32), channels_last,
            ``torch.compile``, fused AdamW on CUDA, cudnn.benchmark, no per-step host sync.
            When torch.compile fails on the machine the tuned mode runs eager and says so.
Images arrive as normalised float32 NCHW (the original loader normalises on the CPU); jaxmm's
step receives uint8 NHWC and normalises on the device, so it does slightly more work.
``--compare`` also runs jaxmm's train step (``train_throughput.run``) and prints the ratios.
torch is a benchmark-only dependency.
"""

import argparse
import os
import sys
import time

# JAX (for --compare) must not grab most of the GPU before torch runs.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import train_throughput as tt  # noqa: E402
from torch import nn  # noqa: E402
from transformers import DistilBertConfig, DistilBertModel, ResNetConfig, ResNetModel  # noqa: E402

from jaxmm.training import losses  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TINY_RESNET = {"embedding_size": 8, "hidden_sizes": [32, 64, 128, 256], "depths": [1, 1, 1, 1]}
TINY_TEXT = {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64}


class FusionClassifier(nn.Module):
    """ResNet + DistilBERT towers and jaxmm's concat fusion head (see module docstring)."""

    def __init__(self, image_arch: str, text_arch: str, vocab_size: int, num_classes: int,
                 proj_dim: int, hidden_dim: int, dropout: float, modality_dropout: float,
                 attention_dropout: float = 0.1):
        super().__init__()
        rcfg = ResNetConfig(**(TINY_RESNET if image_arch == "tiny" else {}))
        tcfg = DistilBertConfig(vocab_size=vocab_size, attention_dropout=attention_dropout,
                                **(TINY_TEXT if text_arch == "tiny" else {}))
        self.image = ResNetModel(rcfg)
        self.text = DistilBertModel(tcfg)
        dims = {"image": rcfg.hidden_sizes[-1], "text": tcfg.dim}
        self.proj = nn.ModuleDict({m: nn.Linear(d, proj_dim) for m, d in dims.items()})
        self.norm = nn.ModuleDict({m: nn.LayerNorm(proj_dim) for m in dims})
        self.null = nn.ParameterDict({m: nn.Parameter(torch.zeros(proj_dim)) for m in dims})
        self.modality_dropout = modality_dropout
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(2 * proj_dim, hidden_dim), nn.GELU(),
            nn.Dropout(dropout), nn.Linear(hidden_dim, num_classes))

    def forward(self, image, input_ids, attention_mask):
        feats = {"image": self.image(pixel_values=image).pooler_output.flatten(1),
                 "text": self.text(input_ids=input_ids,
                                   attention_mask=attention_mask).last_hidden_state[:, 0]}
        batch = image.shape[0]
        keep = torch.ones(batch, 2, dtype=torch.bool, device=image.device)
        if self.training and self.modality_dropout > 0:
            # Drop exactly one random tower for a fraction of the examples, as jaxmm does.
            drop = torch.rand(batch, device=image.device) < self.modality_dropout
            which = torch.randint(0, 2, (batch,), device=image.device)
            keep = ~(drop[:, None] & (torch.arange(2, device=image.device)[None] == which[:, None]))
        parts = []
        for i, m in enumerate(("image", "text")):
            p = self.norm[m](self.proj[m](feats[m]))
            parts.append(torch.where(keep[:, i, None], p, self.null[m].to(p.dtype)))
        return self.head(torch.cat(parts, dim=-1)).float()


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image_arch", default="resnet50", choices=("resnet50", "tiny"))
    p.add_argument("--text_arch", default="distilbert", choices=("distilbert", "tiny"))
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--text_length", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                   help="precision of the tuned mode and of jaxmm (original is always fp32)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--modes", default="original,tuned")
    p.add_argument("--no_compile", action="store_true", help="tuned mode without torch.compile")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 = torch's default (one per core)")
    p.add_argument("--attention_dropout", type=float, default=0.1,
                   help="DistilBERT's attention-probability dropout (0.1, its own, as first "
                        "measured); 0 mirrors jaxmm's config.model.attention='fused'")
    p.add_argument("--compare", action="store_true", help="also run jaxmm's train step")
    p.add_argument("--out", default="")
    return p.parse_args(argv)


def jax_args(args, *extra: str) -> argparse.Namespace:
    """train_throughput's arguments for the same sizes, batch and dtype."""
    return tt.parse_args([
        "--image_arch", args.image_arch, "--text_arch", args.text_arch,
        "--image_size", str(args.image_size), "--text_length", str(args.text_length),
        "--dtype", args.dtype, "--batch_size", str(args.batch_size), "--steps", str(args.steps),
        "--warmup", str(args.warmup), *extra])


def make_model(args, device) -> FusionClassifier:
    """The PyTorch model with jaxmm's default head sizes."""
    c = tt.make_config(jax_args(args))
    return FusionClassifier(args.image_arch, args.text_arch, tt.vocab_size(c),
                            len(tt.TRAIN_COUNTS), c.model.proj_dim, c.model.hidden_dim,
                            c.model.dropout, c.model.modality_dropout,
                            args.attention_dropout).to(device)


def make_optimizer(model: FusionClassifier, args, fused: bool) -> torch.optim.Optimizer:
    """AdamW with jaxmm's per-tower peak learning rates; no decay on biases and norm scales."""
    o = tt.make_config(jax_args(args)).optim
    groups, seen = [], set()
    for prefix, lr in (("image.", o.lr_image), ("text.", o.lr_text), ("", o.lr_head)):
        params = [p for n, p in model.named_parameters()
                  if n.startswith(prefix) and id(p) not in seen]
        seen.update(id(p) for p in params)
        for decay in (True, False):
            groups.append({"params": [p for p in params if (p.ndim > 1) == decay], "lr": lr,
                           "weight_decay": o.weight_decay if decay else 0.0})
    return torch.optim.AdamW(groups, fused=fused)


def torch_batches(args, device, channels_last: bool) -> list:
    """train_throughput's synthetic batches as the original loader delivers them."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    out = []
    for b in tt.synthetic_batches(tt.make_config(jax_args(args)), args.batch_size):
        img = torch.from_numpy(b["image"]).to(device).permute(0, 3, 1, 2).float() / 255.0
        img = ((img - mean) / std).contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        out.append([img] + [torch.from_numpy(b[k]).to(device).long()
                            for k in ("input_ids", "attention_mask", "label")])
    return out


def make_step(model, opt, loss_fn, device, *, original: bool, bf16: bool):
    """One training step; the original returns host floats (a sync), the tuned one tensors."""
    def step(img, ids, mask, labels):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(img, ids, mask)
        loss = loss_fn(logits.float(), labels)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if original:
            return loss.item(), (logits.argmax(1) == labels).sum().item()
        return loss.detach()
    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, batches, n: int, device) -> float:
    """Seconds for ``n`` steps; one device sync at the end."""
    start = time.perf_counter()
    for i in range(n):
        step(*batches[i % len(batches)])
    _sync(device)
    return time.perf_counter() - start


def _set_fast_math(device, on: bool):
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions
        torch.backends.cudnn.benchmark = on


def _warm_up(args, model, opt, loss_fn, device, tuned: bool):
    """Builds the step (compiling it when tuned) and runs the warm-up steps.

    Returns (step, batches, first_step_s, compile_status).
    """
    bf16 = tuned and args.dtype == "bfloat16"
    batches = torch_batches(args, device, channels_last=tuned)
    status = "off"
    run_model = model
    if tuned and not args.no_compile:
        run_model, status = torch.compile(model), "ok"
    step = make_step(run_model, opt, loss_fn, device, original=not tuned, bf16=bf16)
    try:
        first = time_steps(step, batches, 1, device)
    except Exception as e:  # noqa: BLE001 - inductor needs a compiler toolchain; fall back
        status = f"failed, ran eager ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        print(f"torch.compile {status}", file=sys.stderr)
        step = make_step(model, opt, loss_fn, device, original=False, bf16=bf16)
        first = time_steps(step, batches, 1, device)
    time_steps(step, batches, max(args.warmup - 1, 0), device)
    return step, batches, first, status


def run_mode(args, device, mode: str) -> dict:
    """Measures one mode; returns its result dict."""
    tuned = mode == "tuned"
    _set_fast_math(device, tuned)
    torch.manual_seed(0)
    model = make_model(args, device)
    if tuned:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = make_optimizer(model, args, fused=tuned and device.type == "cuda")
    weights = torch.tensor(losses.balanced_class_weights(tt.TRAIN_COUNTS), device=device)
    loss_fn = nn.CrossEntropyLoss(weight=weights)  # sum(w * CE) / sum(w), as jaxmm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step, batches, first, status = _warm_up(args, model, opt, loss_fn, device, tuned)
    seconds = time_steps(step, batches, args.steps, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else "n/a"
    res = {"samples_per_s": round(args.steps * args.batch_size / seconds, 2),
           "step_time_ms": round(1000 * seconds / args.steps, 3),
           "first_step_s": round(first, 2), "peak_memory_bytes": peak,
           "dtype": args.dtype if tuned else "float32",
           "memory_format": "channels_last" if tuned else "NCHW",
           "torch_compile": status}
    del model, opt, step, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _set_fast_math(device, False)
    return res


def run_jaxmm(args) -> dict:
    """jaxmm's train step (part (a) of train_throughput) with the same sizes and batch."""
    return tt.run(jax_args(args, "--skip_e2e"))


def run(args) -> dict:
    """Runs the requested modes (and jaxmm with --compare); returns the result dict."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # CPU runs on a shared machine: avoid oversubscribing
    res = {"benchmark": "torch_reference", "torch_version": torch.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch_threads": torch.get_num_threads(), "image_arch": args.image_arch,
           "text_arch": args.text_arch, "image_size": args.image_size,
           "text_length": args.text_length, "global_batch": args.batch_size,
           "attention_dropout": args.attention_dropout,
           "steps": args.steps, "warmup": args.warmup}
    for mode in [m for m in args.modes.split(",") if m]:
        res[mode] = run_mode(args, device, mode)
    if args.compare:
        jax_res = run_jaxmm(args)
        res["jaxmm"] = {k: jax_res[k] for k in ("samples_per_s", "step_time_ms", "compile_s",
                                                "dtype", "num_devices", "device_kind",
                                                "peak_memory_bytes", "mfu")}
        res["ratios"] = {f"jaxmm_vs_{m}": round(jax_res["samples_per_s"] / res[m]["samples_per_s"],
                                                3)
                         for m in ("original", "tuned") if m in res}
    return res


def format_table(res: dict) -> str:
    """Samples/s, step time and ratios as a readable table."""
    lines = [f"{'run':<10} {'samples/s':>12} {'step ms':>10}  notes"]
    for mode in ("original", "tuned", "jaxmm"):
        if mode in res:
            r = res[mode]
            note = r.get("torch_compile", f"compile {r.get('compile_s')} s")
            lines.append(f"{mode:<10} {r['samples_per_s']:>12.1f} {r['step_time_ms']:>10.1f}  "
                         f"{r['dtype']}, {note}")
    for k, v in res.get("ratios", {}).items():
        lines.append(f"{k}: {v:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Parses flags, runs, prints one JSON line and a table, writes --out."""
    args = parse_args(argv)
    np.random.seed(0)
    res = run(args)
    tt.emit(res, format_table(res), args.out)
    return res


if __name__ == "__main__":
    main()
