"""The networks: the ResNets, group BatchNorm, the optimizers and LR schedule, the loss, the layer table."""
