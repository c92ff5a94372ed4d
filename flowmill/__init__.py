"""flowmill: train flow-based generative models at scale."""
