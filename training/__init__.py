"""Training: models to fine-tune (`models`), a first end-to-end run (`demo`)."""
