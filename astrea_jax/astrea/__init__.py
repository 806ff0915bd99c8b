"""The paper's own parts: projectors, random residual attention (Eq. 2-4), MoCo (Eq. 5-8), router + adapters
(Eq. 9-10), the total loss (Eq. 11), AnyRes, and the composed model."""
