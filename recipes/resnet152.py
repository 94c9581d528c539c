"""Train ResNet-152 on synthetic ImageNet-sized images, with MuTwoAC or without.

    python -m recipes.resnet152                                  # CPU: tiny images, 3 steps
    python -m recipes.resnet152 --batch-size 128 --device-memory 16GB      # GPU, AC at the limit
    python -m recipes.resnet152 --batch-size 64 --no-ac
"""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch import nn

from recipes.common import SyntheticImages, main, parser


class ImageClassifier(L.LightningModule):
    def __init__(self, arch: str = "resnet152", classes: int = 1000, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        import torchvision.models as tvm

        self.net = getattr(tvm, arch)(num_classes=classes)

    @property
    def fsdp_blocks(self) -> set[type]:
        """The classes ``--strategy fsdp`` wraps as one unit each: the residual blocks."""
        from torchvision.models.resnet import BasicBlock, Bottleneck

        return {BasicBlock, Bottleneck}

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def build(args, gpu: bool):
    batch = args.batch_size or (32 if gpu else 2)
    size = args.image_size or (224 if gpu else 64)
    model = ImageClassifier(args.arch, lr=args.lr)
    data = SyntheticImages(batch, args.steps, image_size=size, num_workers=args.num_workers,
                           seed=args.seed)
    return model, data, batch


if __name__ == "__main__":
    p = parser(__doc__, 32, 2)
    p.add_argument("--arch", default="resnet152", help="any torchvision.models ResNet name")
    p.add_argument("--image-size", type=int, default=None, help="default: 224 GPU, 64 CPU")
    main(build, "resnet152", p.parse_args())
