"""On how many public architectures does MuTwoAC engage? Models as users bring them.

Each model is built with random weights in a small configuration (CPU mode) and trained the way its
users train it: HF models with ``labels=`` (the loss inside the model), torchvision and timm models
with cross-entropy outside, ``torch.nn`` models (Transformer, TransformerEncoder, LSTM, GRU) with a
head. Per model, three steps without AC and three with ``auto_checkpoint`` planned halfway
between the plan's floor and the un-checkpointed peak (so that something is recomputed), on the
same batch and seed:

* ``engaged``: the step was captured, planned and ran rewritten; ``reason``: why not;
* ``recomputed``, ``predicted_peak_B``, ``budget_B``, ``baseline_peak_B``: the plan;
* ``max_rel_loss_diff``: the losses with AC against without, step by step;
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
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from benchmarks.zoo import Workload
from lightning_ac import State, auto_checkpoint, plan
from lightning_ac.planner import HEADROOM, default_reserve_B

VOCAB, SEQ = 128, 32


def _hf(name: str, config_cls: str, model_cls: str, task: str, **config) -> tuple:
    """A small HF model trained with ``labels=``: ``task`` is ``lm`` (labels are the ids),
    ``cls`` (one class per sample) or ``seq2seq`` (labels are target ids)."""

    def make(batch: int) -> Workload:
        import transformers

        cfg = getattr(transformers, config_cls)(**config)
        model = getattr(transformers, model_cls)(cfg)
        ids = torch.randint(0, VOCAB, (batch, SEQ))
        mask = torch.ones(batch, SEQ, dtype=torch.long)
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


def _classifier(name: str, family: str, build: Callable[[], nn.Module], size: int = 64) -> tuple:
    """An image classifier with cross-entropy outside the model (the torchvision/timm habit), at
    8 times the batch: at 2 images of 64×64 parameters and optimizer state outweigh the
    activations, and there would be nothing to recompute."""

    def make(batch: int) -> Workload:
        model = build()
        x, y = torch.randn(8 * batch, 3, size, size), torch.randint(0, 10, (8 * batch,))

        def loss(x, y):
            return nn.functional.cross_entropy(model(x), y)

        return Workload(name, model, (x, y), loss)

    return name, family, make


def _tv(name: str, **kw) -> tuple:
    def build():
        import torchvision

        return getattr(torchvision.models, name)(num_classes=10, **kw)

    return _classifier(name, "torchvision", build)


def _timm(name: str, **kw) -> tuple:
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kw)

    return _classifier(name, "timm", build)


class _Recurrent(nn.Module):
    """Embedding, a 2-layer LSTM or GRU, a head on the last step."""

    def __init__(self, cell: type[nn.Module]):
        super().__init__()
        self.emb, self.rnn = nn.Embedding(VOCAB, 32), cell(32, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, ids):
        out, _ = self.rnn(self.emb(ids))
        return self.head(out[:, -1])


class _Encoder(nn.Module):
    """``nn.TransformerEncoder`` over embeddings, mean-pooled into a head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
        self.enc, self.head = nn.TransformerEncoder(layer, 2), nn.Linear(64, 10)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)).mean(1))


def _nn(name: str, build: Callable[[], nn.Module]) -> tuple:
    def make(batch: int) -> Workload:
        model = build()
        ids, y = torch.randint(0, VOCAB, (batch, SEQ)), torch.randint(0, 10, (batch,))

        def loss(ids, y):
            return nn.functional.cross_entropy(model(ids), y)

        return Workload(name, model, (ids, y), loss)

    return name, "torch.nn", make


def _lightning_transformer() -> tuple:
    """Lightning's ``demos.Transformer`` (``nn.Transformer`` with a causal mask), as its demo trains it."""

    def make(batch: int) -> Workload:
        from lightning.pytorch.demos import Transformer

        model = Transformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=64, nlayers=2)
        ids = torch.randint(0, VOCAB, (batch, SEQ))

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


def _midway(profile) -> int:
    """A budget halfway between the plan's floor and the un-checkpointed peak, and never so
    close to the floor that the planner's headroom puts its target under it (where the floor is
    the peak, as where parameters and optimizer state outweigh the activations, the step then
    already fits and runs rewritten with nothing recomputed)."""
    floor = plan(profile, 1).predicted_peak_B
    reachable = math.ceil((floor + default_reserve_B(profile)) / (1 - HEADROOM)) + 1
    return max((floor + profile.peak_bytes) // 2, reachable)


def _steps(step, w: Workload, opt, n: int) -> tuple[list[float], list[float]]:
    losses, times = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = step(*w.inputs)
        loss.backward()
        opt.step()
        times.append((time.perf_counter() - t0) * 1e3)
        losses.append(loss.item())
    return losses, times


def run_model(name: str, family: str, make: Callable[[int], Workload], batch: int,
              steps: int) -> dict:
    """Train ``make(batch)`` without and with AC; the row of the table."""
    row: dict = {"model": name, "family": family, "engaged": False, "reason": ""}
    try:
        torch.manual_seed(0)
        w = make(batch)
        w.model.train()
        state = {k: v.clone() for k, v in w.model.state_dict().items()}
        opt = torch.optim.AdamW(w.model.parameters(), lr=1e-3)
        torch.manual_seed(1)
        ref, ref_ms = _steps(w.loss, w, opt, steps)
    except Exception as exc:  # a model that does not train here at all: not ours to judge
        return {**row, "reason": f"does not train without AC: {type(exc).__name__}: {exc}"[:300]}
    w.model.load_state_dict(state)
    opt = torch.optim.AdamW(w.model.parameters(), lr=1e-3)
    ac = auto_checkpoint(w.loss, opt, module=w.model, budget=_midway, always_rewrite=True,
                         previous_grads="freed")
    torch.manual_seed(1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses, ms = _steps(ac, w, opt, steps)
    except Exception as exc:
        return {**row, "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                "traceback": traceback.format_exc()[-800:]}
    said = [str(c.message) for c in caught if "MuTwoAC" in str(c.message)]
    engaged = ac.state is State.ACTIVE and ac.plan is not None
    row.update(
        engaged=engaged,
        reason="" if engaged else (said[0].splitlines()[0][:300] if said else str(ac.state)),
        graphs=1 if engaged else 0,
        recomputed=len(ac.plan.recomputed) if ac.plan else None,
        stop_reason=ac.plan.stop_reason if ac.plan else None,
        budget_B=ac.plan.budget_B if ac.plan else None,
        baseline_peak_B=ac.plan.baseline_peak_B if ac.plan else None,
        predicted_peak_B=ac.plan.predicted_peak_B if ac.plan else None,
        max_rel_loss_diff=max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, ref)),
        step_ms=statistics.median(ms[1:]) if len(ms) > 1 else None,
        step_ms_no_ac=statistics.median(ref_ms[1:]) if len(ref_ms) > 1 else None,
        planning_s=round(ac.planning_call_s, 2) if ac.planning_call_s else None)
    ac.remove()
    return row


def to_markdown(df: pd.DataFrame) -> str:
    """The table for the docs: engaged or why not, the plan, the loss check."""
    lines = ["| model | family | engaged | recomputed | loss diff | why not |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in df.itertuples():
        diff = f"{r.max_rel_loss_diff:.1e}" if pd.notna(getattr(r, "max_rel_loss_diff", None)) \
            else ""
        rec = "" if pd.isna(getattr(r, "recomputed", None)) else int(r.recomputed)
        reason = str(r.reason).replace("|", "/").replace("\n", " ")[:160]
        lines.append(f"| {r.model} | {r.family} | {'yes' if r.engaged else 'no'} | {rec} | "
                     f"{diff} | {reason} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="model names (default: all)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("reports/coverage"))
    args = ap.parse_args(argv)
    chosen = [m for m in MODELS if args.only is None or m[0] in args.only]
    if args.only and len(chosen) != len(args.only):
        ap.error(f"unknown models in {args.only}; known: {', '.join(m[0] for m in MODELS)}")
    rows = []
    for name, family, make in chosen:
        t0 = time.perf_counter()
        rows.append(run_model(name, family, make, args.batch_size, args.steps))
        torch.compiler.reset()  # (each model's compiled code goes with it)
        print(f"{name:24s} {'engaged' if rows[-1]['engaged'] else 'NOT engaged':12s} "
              f"{time.perf_counter() - t0:6.1f} s  {rows[-1]['reason'][:100]}", flush=True)
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    df.drop(columns=["traceback"], errors="ignore").to_csv(args.out / "coverage.csv", index=False)
    (args.out / "coverage.md").write_text(to_markdown(df))
    print(f"engaged: {int(df.engaged.sum())} of {len(df)} ({df.engaged.mean():.0%}); "
          f"wrote {args.out / 'coverage.csv'}")
    return df


if __name__ == "__main__":
    main()
