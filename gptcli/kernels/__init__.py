"""Speed applied from outside the model: Linear swaps for inference, decoding and training, quantization."""
