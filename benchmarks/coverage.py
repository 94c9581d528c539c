"""On how many public architectures does MuTwoAC engage? Models as users bring them.

Each model is built with random weights in a small configuration (CPU mode) and trained the way its
users train it: HF models with ``labels=`` (the loss inside the model), torchvision and timm models
with cross-entropy outside, ``torch.nn`` models (Transformer, TransformerEncoder, LSTM, GRU) with a
head. Per model, three steps without AC and three with ``auto_checkpoint`` planned halfway
between the plan's floor and the un-checkpointed peak (so that something is recomputed), on the
same batch and seed:

* ``engaged``: the step was captured, planned and ran rewritten; ``reason``: why not;
* ``recomputed``, ``predicted_peak_B``, ``budget_B``, ``baseline_peak_B``: the plan;
  ``eager_saved_B`` and ``offload_eager_B``: what eager code between graphs saves for backward,
  and how much of it the plan keeps in host memory; ``foreign_B``: device memory allocated
  when the AC run's first step began that is not the step's (the budget counts it);
* ``max_rel_loss_diff``: the losses with AC against without, step by step (and
  ``first_rel_loss_diff``: the first step's, before any update: on inductor's kernels later
  steps drift as AdamW turns each rounding difference in a near-zero gradient into a full step);
* ``step_ms`` and ``step_ms_no_ac`` (medians of the steps after the planning one), ``planning_s``.

Writes ``<out>/coverage.csv`` and ``<out>/coverage.md`` (the table) and prints the share engaged.

    PYTHONPATH=. python -m benchmarks.coverage --out reports/coverage
    PYTHONPATH=. python -m benchmarks.coverage --only gpt2 t5 lstm     # a few of them
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from benchmarks.zoo import Workload
from lightning_ac import State, auto_checkpoint, plan
from lightning_ac.planner import HEADROOM, default_reserve_B

VOCAB, SEQ = 128, 32


def _hf(name: str, config_cls: str, model_cls: str, task: str, *, seq: int = SEQ,
        **config) -> tuple:
    """An HF model trained with ``labels=``: ``task`` is ``lm`` (labels are the ids), ``cls``
    (one class per sample) or ``seq2seq`` (labels are target ids)."""

    def make(batch: int) -> Workload:
        import transformers

        cfg = getattr(transformers, config_cls)(**config)
        model = getattr(transformers, model_cls)(cfg)
        ids = torch.randint(0, min(VOCAB, cfg.vocab_size), (batch, seq))
        mask = torch.ones(batch, seq, dtype=torch.long)
        labels = torch.randint(0, 2, (batch,)) if task == "cls" else ids.clone()

        def loss(ids, mask, labels):
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss

        return Workload(name, model, (ids, mask, labels), loss)

    return name, "transformers", make


def _hf_vision(name: str, config_cls: str, model_cls: str, **config) -> tuple:
    def make(batch: int) -> Workload:
        import transformers

        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))
        x = torch.randn(batch, 3, config["image_size"], config["image_size"])
        y = torch.randint(0, 2, (batch,))

        def loss(x, y):
            return model(pixel_values=x, labels=y).loss

        return Workload(name, model, (x, y), loss)

    return name, "transformers", make


def _classifier(name: str, family: str, build: Callable[[], nn.Module], size: int = 64,
                scale: int = 8) -> tuple:
    """An image classifier with cross-entropy outside the model (the torchvision/timm habit), at
    ``scale`` times the batch: at 2 images of 64×64 parameters and optimizer state outweigh the
    activations, and there would be nothing to recompute."""

    def make(batch: int) -> Workload:
        model = build()
        x = torch.randn(scale * batch, 3, size, size)
        y = torch.randint(0, 10, (scale * batch,))

        def loss(x, y):
            return nn.functional.cross_entropy(model(x), y)

        return Workload(name, model, (x, y), loss)

    return name, family, make


def _tv(name: str, size: int = 64, scale: int = 8, **kw) -> tuple:
    def build():
        import torchvision

        return getattr(torchvision.models, name)(num_classes=10, **kw)

    return _classifier(name, "torchvision", build, size, scale)


def _timm(name: str, **kw) -> tuple:
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kw)

    return _classifier(name, "timm", build)


class _Recurrent(nn.Module):
    """Embedding, a 2-layer LSTM or GRU, a head on the last step."""

    def __init__(self, cell: type[nn.Module], dim: int = 32):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.rnn = cell(dim, 2 * dim, num_layers=2, batch_first=True)
        self.head = nn.Linear(2 * dim, 10)

    def forward(self, ids):
        out, _ = self.rnn(self.emb(ids))
        return self.head(out[:, -1])


class _Encoder(nn.Module):
    """``nn.TransformerEncoder`` over embeddings, mean-pooled into a head."""

    def __init__(self, dim: int = 64, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, batch_first=True)
        self.enc, self.head = nn.TransformerEncoder(layer, layers), nn.Linear(dim, 10)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)).mean(1))


def _nn(name: str, build: Callable[[], nn.Module], seq: int = SEQ) -> tuple:
    def make(batch: int) -> Workload:
        model = build()
        ids, y = torch.randint(0, VOCAB, (batch, seq)), torch.randint(0, 10, (batch,))

        def loss(ids, y):
            return nn.functional.cross_entropy(model(ids), y)

        return Workload(name, model, (ids, y), loss)

    return name, "torch.nn", make


def _lightning_transformer(ninp: int = 32, nhead: int = 2, nlayers: int = 2,
                           seq: int = SEQ) -> tuple:
    """Lightning's ``demos.Transformer`` (``nn.Transformer`` with a causal mask), as its demo trains it."""

    def make(batch: int) -> Workload:
        from lightning.pytorch.demos import Transformer

        model = Transformer(vocab_size=VOCAB, ninp=ninp, nhead=nhead, nhid=2 * ninp,
                            nlayers=nlayers)
        ids = torch.randint(0, VOCAB, (batch, seq))

        def loss(ids, target):
            return nn.functional.nll_loss(model(ids, target), target.view(-1))

        return Workload("nn.Transformer", model, (ids, ids.clone()), loss)

    return "nn.Transformer", "torch.nn", make


_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              vocab_size=VOCAB, max_position_embeddings=64)

MODELS = [
    _hf("gpt2", "GPT2Config", "GPT2LMHeadModel", "lm", n_embd=32, n_layer=2, n_head=2,
        vocab_size=VOCAB, n_positions=64),
    _hf("t5", "T5Config", "T5ForConditionalGeneration", "seq2seq", d_model=32, d_ff=64, d_kv=16,
        num_layers=2, num_heads=2, vocab_size=VOCAB, decoder_start_token_id=0),
    _hf("bart", "BartConfig", "BartForConditionalGeneration", "seq2seq", d_model=32,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64),
    _hf("llama", "LlamaConfig", "LlamaForCausalLM", "lm", **_SMALL, num_key_value_heads=2),
    _hf("mistral", "MistralConfig", "MistralForCausalLM", "lm", **_SMALL, num_key_value_heads=2),
    _hf("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "lm", **_SMALL, num_key_value_heads=2),
    _hf("deberta-v2", "DebertaV2Config", "DebertaV2ForSequenceClassification", "cls", **_SMALL),
    _hf("bert", "BertConfig", "BertForSequenceClassification", "cls", **_SMALL),
    _hf("roberta", "RobertaConfig", "RobertaForMaskedLM", "lm",
        **{**_SMALL, "max_position_embeddings": 66}),
    _hf("distilbert", "DistilBertConfig", "DistilBertForSequenceClassification", "cls", dim=32,
        n_layers=2, n_heads=2, hidden_dim=64, vocab_size=VOCAB, max_position_embeddings=64),
    _hf("albert", "AlbertConfig", "AlbertForMaskedLM", "lm", **_SMALL, embedding_size=16),
    _hf("electra", "ElectraConfig", "ElectraForSequenceClassification", "cls", **_SMALL,
        embedding_size=16),
    _hf("opt", "OPTConfig", "OPTForCausalLM", "lm", hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64,
        word_embed_proj_dim=32),
    _hf("gpt-neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", "lm", **_SMALL),
    _hf_vision("vit", "ViTConfig", "ViTForImageClassification", hidden_size=32,
               num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8, num_labels=2),
    _tv("resnet18"), _tv("mobilenet_v3_small"), _tv("efficientnet_b0"), _tv("densenet121"),
    _tv("squeezenet1_0"), _tv("convnext_tiny"), _tv("regnet_y_400mf"), _tv("shufflenet_v2_x0_5"),
    _timm("resnet10t"), _timm("convnext_atto"), _timm("vit_tiny_patch16_224", img_size=64),
    _timm("mixer_s32_224", img_size=64), _timm("regnetx_002"), _timm("ghostnet_050"),
    _lightning_transformer(),
    _nn("nn.TransformerEncoder", _Encoder),
    _nn("lstm", lambda: _Recurrent(nn.LSTM)),
    _nn("gru", lambda: _Recurrent(nn.GRU)),
]


GPU_MODELS = [  # (name, family, make, batch): sizes people train at, on one GPU
    (*_hf("gpt2", "GPT2Config", "GPT2LMHeadModel", "lm", seq=1024), 8),
    (*_hf("t5", "T5Config", "T5ForConditionalGeneration", "seq2seq", seq=512,
          decoder_start_token_id=0), 16),
    (*_hf("bart", "BartConfig", "BartForConditionalGeneration", "seq2seq", seq=512, d_model=768,
          encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
          decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072), 16),
    (*_hf("llama", "LlamaConfig", "LlamaForCausalLM", "lm", seq=1024, hidden_size=1024,
          num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
          intermediate_size=2816, vocab_size=32000), 8),
    (*_hf("bert", "BertConfig", "BertForSequenceClassification", "cls", seq=512), 32),
    (*_hf("deberta-v2", "DebertaV2Config", "DebertaV2ForSequenceClassification", "cls", seq=512,
          hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
          intermediate_size=3072, vocab_size=32000), 16),
    (*_hf_vision("vit", "ViTConfig", "ViTForImageClassification", image_size=224,
                 num_labels=10), 64),
    (*_tv("resnet50", size=224, scale=1), 64),
    (*_tv("convnext_tiny", size=224, scale=1), 64),
    (*_tv("efficientnet_b0", size=224, scale=1), 128),
    (*_lightning_transformer(ninp=512, nhead=8, nlayers=6, seq=256), 32),
    (*_nn("lstm", lambda: _Recurrent(nn.LSTM, dim=512), seq=256), 64),
]


def _midway(profile) -> int:
    """A budget halfway between the plan's floor and the un-checkpointed peak, and never so
    close to the floor that the planner's headroom puts its target under it (where the floor is
    the peak, as where parameters and optimizer state outweigh the activations, the step then
    already fits and runs rewritten with nothing recomputed)."""
    floor = plan(profile, 1).predicted_peak_B
    reachable = math.ceil((floor + default_reserve_B(profile)) / (1 - HEADROOM)) + 1
    return max((floor + profile.peak_bytes) // 2, reachable)


@dataclass
class _Run:
    losses: list[float] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    """Device peaks per step (CUDA)."""
    planning: list[bool] = field(default_factory=list)
    """Whether the step was a planning (or capture) call."""

    def step_ms(self) -> float | None:
        ms = [t for t, p in zip(self.ms[1:], self.planning[1:]) if not p]
        return statistics.median(ms) if ms else None


def _steps(step, w: Workload, opt, n: int, ac=None) -> _Run:
    """``n`` training steps; on CUDA each step's peak is measured and handed to ``ac`` (as
    the callback does: the closed loop that re-plans a step over its budget)."""
    run = _Run()
    cuda = w.inputs[0].is_cuda
    for _ in range(n):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = step(*w.inputs)
        loss.backward()
        opt.step()
        run.losses.append(loss.item())  # (synchronizes)
        run.ms.append((time.perf_counter() - t0) * 1e3)
        run.planning.append(bool(getattr(ac, "planned_last_call", False)))
        if cuda:
            run.peaks.append(torch.cuda.max_memory_allocated())
            if ac is not None and not run.planning[-1]:
                ac.observe_peak(run.peaks[-1])
    return run


def _planned_steps(ac) -> list:
    """Every PlannedStep of ``ac``'s shapes: one per shape, or one per graph of a split step."""
    out = []
    for s in ac.plans.values():
        if s.planned is not None:
            out.append(s.planned[0])
        if s.graphs is not None:
            out += [g.planned for g in s.graphs.captured if g.planned is not None]
    return out


def run_model(name: str, family: str, make: Callable[[int], Workload], batch: int,
              steps: int, device: str = "cpu", budget_share: float | None = None,
              kernels: str = "eager") -> dict:
    """Train ``make(batch)`` without and with AC; the row of the table. On the CPU the budget is
    halfway between the plan's floor and the un-checkpointed peak; with ``budget_share`` it is
    that share of the measured un-checkpointed peak (CUDA). ``kernels`` as for
    ``auto_checkpoint``."""
    row: dict = {"model": name, "family": family, "engaged": False, "reason": ""}
    try:
        torch.manual_seed(0)
        w = make(batch)
        w.model.to(device).train()
        w = replace(w, inputs=tuple(t.to(device) for t in w.inputs))
        # (kept in host memory: held on the device, it would take from the AC run's budget)
        state = {k: v.detach().to("cpu", copy=True) for k, v in w.model.state_dict().items()}
        opt = torch.optim.AdamW(w.model.parameters(), lr=1e-3)
        torch.manual_seed(1)
        ref = _steps(w.loss, w, opt, steps)
    except Exception as exc:  # a model that does not train here at all: not ours to judge
        return {**row, "reason": f"does not train without AC: {type(exc).__name__}: {exc}"[:300]}
    w.model.load_state_dict(state)
    del opt
    opt = torch.optim.AdamW(w.model.parameters(), lr=1e-3)
    budget = _midway if budget_share is None else int(budget_share * max(ref.peaks[1:]))
    ac = auto_checkpoint(w.loss, opt, module=w.model, budget=budget, always_rewrite=True,
                         previous_grads="freed", kernels=kernels)
    torch.manual_seed(1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = _steps(ac, w, opt, steps, ac)
    except Exception as exc:
        return {**row, "reason": f"{type(exc).__name__}: {exc}"[:600].replace("\n", " "),
                "traceback": traceback.format_exc()[-1500:]}
    said = [str(c.message) for c in caught if "MuTwoAC" in str(c.message)]
    engaged = ac.state is State.ACTIVE and ac.plan is not None
    graphs = ac.last.graphs if ac.last is not None else None
    measured = [p for p, planning in zip(run.peaks, run.planning) if not planning]
    row.update(
        engaged=engaged,
        reason="" if engaged else (said[0].splitlines()[0][:300] if said else str(ac.state)),
        graphs=(len(graphs.captured) if graphs is not None else 1) if engaged else 0,
        eager_saved_B=sum(ac.profile.summary.get("eager_saved_B", [])) if ac.profile else None,
        offload_eager_B=ac.plan.offload_eager_B if ac.plan else None,
        foreign_B=ac.last.foreign_B if ac.last is not None else None,
        split_by=ac.last.not_one_graph[:200] if ac.last is not None else "",
        recomputed=len(ac.plan.recomputed) if ac.plan else None,
        swapped=len(ac.plan.swapped) if ac.plan else None,
        stop_reason=ac.plan.stop_reason if ac.plan else None,
        budget_B=ac.plan.budget_B if ac.plan else None,
        baseline_peak_B=ac.plan.baseline_peak_B if ac.plan else None,
        predicted_peak_B=ac.plan.predicted_peak_B if ac.plan else None,
        no_ac_peak_B=max(ref.peaks[1:]) if len(ref.peaks) > 1 else None,
        measured_peak_B=max(measured) if measured else None,
        steps_over_budget=sum(p > ac.plan.budget_B for p in measured[1:])
        if measured and ac.plan and ac.plan.budget_B else None,
        replans=ac.replans,
        max_rel_loss_diff=max(abs(a - b) / max(abs(b), 1e-12)
                              for a, b in zip(run.losses, ref.losses)),
        first_rel_loss_diff=abs(run.losses[0] - ref.losses[0]) / max(abs(ref.losses[0]), 1e-12),
        step_ms=run.step_ms(), step_ms_no_ac=ref.step_ms(),
        planning_s=round(sum(t for t, p in zip(run.ms, run.planning) if p) / 1e3, 2))
    if kernels == "inductor":
        planned = _planned_steps(ac)
        row["on_inductor"] = f"{sum(p.on_inductor for p in planned)}/{len(planned)}"
    ac.remove()
    return row


def to_markdown(df: pd.DataFrame) -> str:
    """The table for the docs: engaged or why not, how many graphs, the plan, the measured peak
    against the budget (CUDA), the overhead and the loss check."""
    def cell(r, key, fmt):
        v = getattr(r, key, None)
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt(v)

    from lightning_ac.report import format_bytes

    fused = "on_inductor" in df.columns  # (a run with kernels="inductor")
    extra = " on inductor | first-step loss diff |" if fused else ""
    lines = ["| model | family | engaged | graphs | recomputed | eager saved | peak / budget | "
             f"step vs no AC | loss diff |{extra} why not, or what split the step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
             + (" --- | --- |" if fused else "") + " --- |"]
    for r in df.itertuples():
        peak = cell(r, "measured_peak_B", lambda v, r=r: f"{v / r.budget_B:.2f}")
        over = cell(r, "step_ms", lambda v, r=r: f"{v / r.step_ms_no_ac:.2f}x")
        why = r.reason if r.reason else getattr(r, "split_by", "")
        why = "" if not isinstance(why, str) else why.replace("|", "/").replace("\n", " ")[:140]
        lines.append(
            f"| {r.model} | {r.family} | {'yes' if r.engaged else 'no'} | "
            f"{cell(r, 'graphs', lambda v: str(int(v)))} | "
            f"{cell(r, 'recomputed', lambda v: str(int(v)))} | "
            f"{cell(r, 'eager_saved_B', lambda v: format_bytes(int(v)) if v else '')} | "
            f"{peak} | {over} | {cell(r, 'max_rel_loss_diff', lambda v: f'{v:.1e}')} | "
            + (f"{cell(r, 'on_inductor', str)} | "
               f"{cell(r, 'first_rel_loss_diff', lambda v: f'{v:.1e}')} | " if fused else "")
            + f"{why} |")
    return "\n".join(lines) + "\n"


def _write(df: pd.DataFrame, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    df.drop(columns=["traceback"], errors="ignore").to_csv(out / f"{stem}.csv", index=False)
    (out / f"{stem}.md").write_text(to_markdown(df))


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="model names (default: all)")
    ap.add_argument("--batch-size", type=int, default=2, help="CPU mode's batch")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--gpu", action="store_true",
                    help="GPU mode: realistic sizes (GPU_MODELS), budget a share of each "
                         "model's measured un-checkpointed peak")
    ap.add_argument("--budget-share", type=float, default=0.6, help="GPU mode's budget share")
    ap.add_argument("--deterministic", action="store_true",
                    help="torch.use_deterministic_algorithms(True), so that the losses with and "
                         "without AC can be compared exactly (set CUBLAS_WORKSPACE_CONFIG=:4096:8 "
                         "too)")
    ap.add_argument("--kernels", default="eager", choices=["eager", "inductor"],
                    help="how the planned step runs (auto_checkpoint's kernels); with inductor "
                         "dropout draws with eager's kernels (inductor's fallback_random), so "
                         "that the losses compare, and the table gets 'on_inductor' (graphs "
                         "that ran inductor's code / graphs planned) and a file of its own")
    ap.add_argument("--out", type=Path, default=Path("reports/coverage"))
    args = ap.parse_args(argv)
    if args.kernels == "inductor":
        from torch._inductor import config

        with config.patch(fallback_random=True):  # (for this run only: not a global setting)
            return _run(args, ap)
    return _run(args, ap)


def _run(args, ap) -> pd.DataFrame:
    """The run :func:`main` parsed: every chosen model, the table written as it grows."""
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    pool = GPU_MODELS if args.gpu else [(*m, args.batch_size) for m in MODELS]
    chosen = [m for m in pool if args.only is None or m[0] in args.only]
    if args.only and len(chosen) != len(args.only):
        ap.error(f"unknown models in {args.only}; known: {', '.join(m[0] for m in pool)}")
    stem = ("coverage_gpu" if args.gpu else "coverage") + \
        ("_inductor" if args.kernels == "inductor" else "")
    rows = []
    for name, family, make, batch in chosen:
        t0 = time.perf_counter()
        rows.append(run_model(name, family, make, batch, args.steps,
                              device="cuda" if args.gpu else "cpu",
                              budget_share=args.budget_share if args.gpu else None,
                              kernels=args.kernels))
        torch.compiler.reset()  # (each model's compiled code goes with it)
        if args.gpu:
            torch.cuda.empty_cache()
        _write(pd.DataFrame(rows), args.out, stem)  # so far: a run cut short keeps its rows
        print(f"{name:24s} {'engaged' if rows[-1]['engaged'] else 'NOT engaged':12s} "
              f"{time.perf_counter() - t0:6.1f} s  {rows[-1]['reason'][:100]}", flush=True)
        if rows[-1].get("traceback"):
            print(rows[-1]["traceback"], flush=True)
        print({k: rows[-1].get(k) for k in ("graphs", "on_inductor", "budget_B", "measured_peak_B",
                                            "steps_over_budget", "replans", "step_ms",
                                            "step_ms_no_ac", "max_rel_loss_diff")}, flush=True)
    df = pd.DataFrame(rows)
    _write(df, args.out, stem)
    print(f"engaged: {int(df.engaged.sum())} of {len(df)} ({df.engaged.mean():.0%}); "
          f"wrote {args.out / (stem + '.csv')}")
    return df


if __name__ == "__main__":
    main()
