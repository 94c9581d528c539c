"""Training recipes for the reference models (ResNet-152, BERT-base) with and without MuTwoAC."""
