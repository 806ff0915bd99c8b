"""Train state, losses, optimizers and step functions."""
