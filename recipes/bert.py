"""Train BERT-base (masked LM, random init) on synthetic tokens, with MuTwoAC or without.

    python -m recipes.bert                                       # CPU: 2-layer BERT, 3 steps
    python -m recipes.bert --batch-size 64 --device-memory 16GB          # GPU, AC at the limit
    python -m recipes.bert --batch-size 16 --no-ac
"""

from __future__ import annotations

import lightning.pytorch as L
import torch

from recipes.common import SyntheticTokens, main, parser

TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=128)


class MaskedLM(L.LightningModule):
    def __init__(self, config: dict, lr: float = 1e-4):
        super().__init__()
        self.save_hyperparameters()
        from transformers import BertConfig, BertForMaskedLM

        self.bert = BertForMaskedLM(BertConfig(**config))

    @property
    def fsdp_blocks(self) -> set[type]:
        """The classes ``--strategy fsdp`` wraps as one unit each: the encoder layer."""
        from transformers.models.bert.modeling_bert import BertLayer

        return {BertLayer}

    def forward(self, input_ids, attention_mask, labels):
        # attention_mask passed explicitly: without it HF checks the batch for padding on the
        # host, which breaks the graph capture
        return self.bert(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    def training_step(self, batch, batch_idx):
        loss = self(*batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def build(args, gpu: bool):
    tiny = args.tiny or not gpu
    batch = args.batch_size or (32 if gpu else 4)
    seq = args.seq_len or (512 if not tiny else 64)
    config = dict(TINY) if tiny else {}
    model = MaskedLM(config, lr=args.lr)
    data = SyntheticTokens(batch, args.steps, seq_len=seq,
                           vocab_size=config.get("vocab_size", 30522),
                           num_workers=args.num_workers, seed=args.seed)
    return model, data, batch


if __name__ == "__main__":
    p = parser(__doc__, 32, 4)
    p.add_argument("--seq-len", type=int, default=None, help="default: 512 (64 when tiny)")
    p.add_argument("--tiny", action="store_true", help="2-layer BERT (the CPU default)")
    main(build, "bert", p.parse_args())
