"""Evaluation tools: teacher-forced KL divergence against the fp16 cache, memory."""
