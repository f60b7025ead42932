"""The svdtrain tool: reference models, data, the training loop and the staged pipeline."""
