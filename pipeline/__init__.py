"""quantpipe: a staged, cached pipeline from Hugging Face LLMs to quantized TensorRT artifacts."""
