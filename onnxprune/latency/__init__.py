"""Latency-aware pruning: channel sweeps (round_to), per-node latency models from onnxruntime
profiles, and the measure-and-correct search for a latency target."""
